"""The CPU device: gloo collectives, the reference kernels (PyTorch's RMSNorm and attention when asked for), and the
bridge that lets Megatron run without CUDA.

Megatron assumes CUDA in many places (see ``../shared/notes/megatron-on-cpu.md`` in the development notes and
``aquila_npu.plugins.cpu_bridge``). Everything this plugin changes is a registered patch with its reason, listed by
``aquila-npu plugins --patches --device cpu``; the Megatron flags it needs are defaults beneath the user's flags.
"""

from __future__ import annotations

from aquila_npu.hookspecs import hookimpl

DEVICE = "cpu"

# Megatron modules that call torch.cuda.* or put tensors on "cuda" on the paths aquila-npu uses (model, tensor and
# pipeline parallelism, optimizer, checkpointing, inference, Megatron-LM's training loop). Each gets the CPU-bridged
# ``torch``.
MEGATRON_CUDA_CALLERS = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.inference.communication_utils",
    "megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper",
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
    "megatron.core.inference.utils",
    "megatron.core.inference.text_generation_server.endpoints.common",
    "megatron.core.inference.text_generation_server.tokenization",
    "megatron.training.arguments",
    "megatron.training.checkpointing",
    "megatron.training.initialize",
    "megatron.training.training",
    "megatron.training.utils",
)


@hookimpl
def aquila_npu_devices():
    return {DEVICE: 100}


@hookimpl
def aquila_npu_device_available(device):
    return True if device == DEVICE else None


@hookimpl
def aquila_npu_distributed_backend(device):
    return "gloo" if device == DEVICE else None


@hookimpl
def aquila_npu_initialize_device(device, local_rank):
    if device != DEVICE:
        return None
    import os

    import torch

    # Megatron-LM asserts this for tensor parallelism (it orders CUDA kernel launches; meaningless on the CPU)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return torch.device("cpu")


@hookimpl
def aquila_npu_megatron_defaults(device):
    if device != DEVICE:
        return None
    return {
        "--distributed-backend": "gloo",
        "--transformer-impl": "local",
        # CUDA-only fusions and extensions
        "--no-rope-fusion": None,
        "--no-persist-layer-norm": None,
        "--no-gradient-accumulation-fusion": None,
        "--no-masked-softmax-fusion": None,
        "--no-bias-swiglu-fusion": None,
        "--no-bias-dropout-fusion": None,
        # weights are made on the CPU anyway; this way they do not depend on the tensor-parallel size
        "--use-cpu-initialization": None,
    }


@hookimpl
def aquila_npu_kernels(device):
    if device != DEVICE:
        return None
    from aquila_npu.kernels.seams import pytorch_kernels

    # the reference by default; the seed's --use-fused-rmsnorm / --use-flash-attn take PyTorch's CPU kernels
    return pytorch_kernels(default=False)


COLUMN_MAJOR_PAD = 16  # fp32 elements: one 64-byte cache line


@hookimpl
def aquila_npu_prepare_inference_model(model, device):
    if device == DEVICE:
        store_linear_weights_column_major(model)
        give_output_layer_both_layouts(model)


def store_linear_weights_column_major(model) -> None:
    """Store each fp32 tensor-parallel linear weight ``[out, in]`` of ``model`` (a ``GPTModel``) transposed in
    memory: ``[in, out]`` rows (with ``COLUMN_MAJOR_PAD`` unused floats after each), the same tensor seen through
    strides ``(1, out + pad)``.

    megatron-core's linears compute ``input @ weight.t()``. On the CPU, with few rows of input — every decode step —
    MKL's fp32 GEMM reads a contiguous ``[in, out]`` operand much faster than the transposed view of a row-major
    weight, and a decode step is nearly all such products (``benchmarks/README.md``, "Linear weights stored
    column-major": one row through QKV or FC1 at hidden 1024 about 2x faster).
    The pad keeps the rows from starting a power of two apart (hidden sizes are), a guard against reads down a
    column falling on the same cache sets; its effect was within this machine's noise, at 64 bytes a row. bf16 and
    fp16 products run other kernels (oneDNN's) and were not measured, so those weights are left as they are. Values
    are untouched. The output layer is left to ``give_output_layer_both_layouts``."""
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    output_layer = getattr(model, "output_layer", None)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module is not output_layer
                and weight is not None and weight.dtype == torch.float32 and weight.dim() == 2
                and weight.stride(0) != 1):
            weight.data = column_major_copy(weight.data)


def column_major_copy(weight):
    """``weight`` ``[out, in]`` stored as ``[in, out]`` rows (``COLUMN_MAJOR_PAD`` floats after each), seen as
    ``[out, in]``: equal values, strides ``(1, out + pad)``."""
    rows, columns = weight.shape
    storage = weight.new_empty(columns, rows + COLUMN_MAJOR_PAD)
    storage[:, :rows].copy_(weight.detach().t())
    return storage[:, :rows].t()


def give_output_layer_both_layouts(model) -> None:
    """The fp32 output layer of ``model`` (a ``GPTModel``) keeps its row-major weight and gains a column-major copy;
    its product uses the copy for one row of input and ``(weight @ input.t()).t()`` on the row-major weight for
    more.

    The output layer (``[vocab, hidden]``) is the largest product of a decode step, and which operand MKL reads
    fastest depends on the row count (``benchmarks/README.md``, "Output layer in both layouts"): at one row the
    column-major operand (1.9 against 6.2 ms at hidden 128); from two rows up to full prompts, the row-major weight
    as the left operand (4.4 against 7.4 ms column-major and 8.0 ms as megatron-core computes it, at 8 rows). The
    cost is a second copy of this one weight (vocab x hidden floats: 51 MB at hidden 128, 1.6 GB at Aquila2-7B's
    4096) for the life of the inference model. Anything else — gradients on, another weight passed in, a bias,
    sequence parallelism — goes to megatron-core's own product."""
    import torch

    layer = getattr(model, "output_layer", None)
    if layer is None:
        return
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    weight = model.shared_embedding_or_output_weight() if tied else layer.weight
    if (weight is None or weight.dtype != torch.float32 or weight.dim() != 2 or layer.bias is not None
            or layer.sequence_parallel or "_forward_impl" in vars(layer)):
        return
    if not weight.is_contiguous():
        weight.data = weight.data.contiguous()
    source, column_major, megatron_product = weight, column_major_copy(weight), layer._forward_impl

    def output_layer_product(input, weight, bias=None, *args, **kwargs):
        if (torch.is_grad_enabled() or weight is not source or bias is not None
                or kwargs.get("sequence_parallel")):
            return megatron_product(input, weight, bias, *args, **kwargs)
        rows = input.reshape(-1, input.shape[-1])
        if rows.shape[0] == 1:
            product = rows @ column_major.t()
        else:
            product = (weight @ rows.t()).t()
        return product.reshape(*input.shape[:-1], product.shape[-1])

    layer._forward_impl = output_layer_product


@hookimpl
def aquila_npu_register_patches(registry, device):
    if device != DEVICE:
        return
    import torch

    from aquila_npu.megatron_lm import without_triton
    from aquila_npu.plugins import cpu_bridge

    for module in MEGATRON_CUDA_CALLERS:
        registry.register(
            f"{module}.torch", lambda original: cpu_bridge.torch_for_megatron(), owner=DEVICE,
            reason="calls torch.cuda.* / device='cuda'; sees a torch whose CUDA means the CPU (scoped to Megatron)")
    registry.register(
        "megatron.core.tensor_parallel.random._get_cuda_rng_state",
        lambda original: lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),
        owner=DEVICE, reason="the model-parallel RNG tracker keeps its per-rank states in the CPU generator")
    registry.register(
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        lambda original: lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
        owner=DEVICE, reason="CPU torch silently ignores CUDA RNG state; restore the tracker's CPU generator state")
    registry.register(
        "torch.Tensor.cuda", lambda original: cpu_bridge.tensor_cuda, owner=DEVICE,
        reason="Megatron moves batches and buffers with .cuda(); without CUDA they stay on the CPU")
    registry.register(
        "torch.nn.Module.cuda", lambda original: cpu_bridge.module_cuda, owner=DEVICE,
        reason="Megatron-LM's get_model() calls model.cuda(); without CUDA the model stays on the CPU")
    # the optimizer module's own imported copy of the clipping function too: patched only in clip_grads, it is
    # missed when megatron.core.optimizer was imported before the patches were applied
    for target in ("megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
                   "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
                   "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
                   "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups"):
        registry.register(
            target, cpu_bridge.with_cuda_type_names, owner=DEVICE,
            reason="asserts or dispatches on tensor.type() == 'torch.cuda.FloatTensor' (and Half/BFloat16); "
                   "runs with CPU tensors reporting the CUDA type names")
    registry.register(
        "megatron.legacy.fused_kernels.load", lambda original: lambda args: None, owner=DEVICE,
        reason="Megatron-LM's initialisation probes nvcc under CUDA_HOME for its legacy fused kernels; "
               "there are no CUDA kernels to load on the CPU")
    registry.register(
        "megatron.core.inference.communication_utils._is_cuda", lambda original: _is_a_tensor, owner=DEVICE,
        reason="the inference broadcasts (prompts and sampling parameters across ranks) assert CUDA tensors; on the "
               "CPU they are CPU tensors, which gloo broadcasts")
    registry.register(
        "megatron.training.initialize.initialize_megatron", _bridge_the_calling_script, owner=DEVICE,
        reason="Megatron-LM's scripts put tensors on device='cuda' in their own code too (the text generation "
               "server's request loop, the static inference example's memory report); the script calling "
               "initialize_megatron sees the CPU-bridged torch, as Megatron's modules do")
    registry.register(
        "lm_eval.models.megatron_lm.torch", lambda original: cpu_bridge.torch_for_megatron(), owner=DEVICE,
        reason="lm-evaluation-harness's megatron_lm model puts its inputs on cuda:{torch.cuda.current_device()}; "
               "it sees the CPU-bridged torch, as Megatron's modules do")
    registry.register(
        "megatron.core.inference.engines.static_engine.StaticInferenceEngine.__init__", _legacy_static_engine,
        owner=DEVICE,
        reason="the engine first builds megatron-core's dynamic engine (paged KV cache in a 40 GB CUDA buffer, "
               "CUDA graphs) and falls back to the static one after a CUDA error; on the CPU the static engine "
               "is chosen directly")
    without_triton.register_stubs(registry, owner=DEVICE)


def _is_a_tensor(tensor) -> None:
    assert tensor is not None


def _bridge_the_calling_script(original):
    import functools
    import sys

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        result = original(*args, **kwargs)
        script = vars(sys.modules["__main__"])
        from aquila_npu.plugins import cpu_bridge
        import torch

        if script.get("torch") is torch:
            script["torch"] = cpu_bridge.torch_for_megatron()
        return result

    return initialize_megatron


def _legacy_static_engine(original):
    import functools
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["legacy"] = True
        return original(*bound.args, **bound.kwargs)

    return __init__
