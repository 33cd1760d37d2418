"""The NVIDIA CUDA device: NCCL collectives; megatron-core's CUDA paths need no bridging.

Fused kernels, all on by default: Transformer Engine's RMSNorm and fused RoPE when it is installed (megatron-core's
own ``TENorm`` and ``apply_rope_fusion`` path); otherwise PyTorch's ``rms_norm`` and no fused RoPE. Attention is
flash-attn's ``flash_attn_func`` when installed, else PyTorch's scaled-dot-product attention (its FlashAttention-2
backend for causal training); SwiGLU is megatron-core's fused bias-SwiGLU (``torch.compile``).
"""

from __future__ import annotations

import importlib.util

from aquila_npu.hookspecs import hookimpl

DEVICE = "cuda"


@hookimpl
def aquila_npu_devices():
    return {DEVICE: 200}


@hookimpl
def aquila_npu_device_available(device):
    if device != DEVICE:
        return None
    import torch

    return torch.cuda.is_available()


@hookimpl
def aquila_npu_device_unavailable_reason(device):
    if device != DEVICE:
        return None
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build; install a CUDA build of torch"
    return "torch finds no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"


@hookimpl
def aquila_npu_distributed_backend(device):
    return "nccl" if device == DEVICE else None


@hookimpl
def aquila_npu_initialize_device(device, local_rank):
    if device != DEVICE:
        return None
    import torch

    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


@hookimpl
def aquila_npu_megatron_defaults(device):
    if device != DEVICE:
        return None
    if not _transformer_engine_installed():
        # without Transformer Engine megatron-core runs its local modules
        return {"--transformer-impl": "local", "--no-persist-layer-norm": None}
    return {}


def _transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@hookimpl
def aquila_npu_kernels(device):
    if device != DEVICE:
        return None
    from aquila_npu.kernels.seams import Kernel, pytorch_kernels

    offered = pytorch_kernels(default=True)
    offered["swiglu"] = Kernel("megatron-core fused bias-SwiGLU (torch.compile)", None,
                               {"bias_activation_fusion": True, "use_te_activation_func": False})
    if importlib.util.find_spec("flash_attn") is not None:
        offered["attention"] = Kernel("flash-attn flash_attn_func (SDPA for masked or fp32 calls)",
                                      "aquila_npu.kernels.flash.FlashAttnAttention")
    if _transformer_engine_installed():
        offered["rms_norm"] = Kernel("Transformer Engine RMSNorm (megatron-core TENorm)",
                                     "megatron.core.extensions.transformer_engine.TENorm")
        offered["rotary"] = Kernel("Transformer Engine fused RoPE (megatron-core apply_rope_fusion)", None,
                                   {"apply_rope_fusion": True})
    return offered
