"""Build the megatron-core ``GPTModel`` for a ``ModelSpec`` on the current parallel state and device."""

from __future__ import annotations

from typing import Any

from aquila_npu import layers, plugin_manager
from aquila_npu.specs import ModelSpec


def build_gpt_model(spec: ModelSpec, *, kernels=None, pre_process: bool | None = None,
                    post_process: bool | None = None, parallel_output: bool = True, vp_stage: int | None = None,
                    **config_overrides: Any):
    """A ``GPTModel`` for this rank's tensor/pipeline slice (``aquila_npu.distributed.initialize`` first).

    ``config_overrides`` are ``TransformerConfig`` fields (e.g. ``params_dtype``, ``sequence_parallel``);
    ``kernels`` a ``KernelSet`` (default: the one this process was initialised with).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    device = plugin_manager.active_device()
    kernels = kernels or plugin_manager.active_kernels()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    values = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=device == "cpu",
        **kernels.config_overrides(),
    )
    values.update(config_overrides)
    if "params_dtype" in config_overrides:  # keep the mixed-precision flags consistent with the dtype
        import torch

        values.setdefault("bf16", config_overrides["params_dtype"] is torch.bfloat16)
        values.setdefault("fp16", config_overrides["params_dtype"] is torch.float16)
    config = spec.transformer_config(**values)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=layers.block_spec(kernels, config, vp_stage=vp_stage),
        vocab_size=spec.padded_vocab_size(tp),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=not spec.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(spec.rotary_base),
        seq_len_interpolation_factor=spec.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage,
    )


def full_vocab_logits(model, tokens, vocab_size: int):
    """fp32 logits ``[batch, seq, vocab_size]`` on the CPU of a ``GPTModel`` built with ``parallel_output=False``
    (causal attention, positions 0..seq-1, the padded vocabulary rows cut off)."""
    import torch

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., :vocab_size].float().cpu()
