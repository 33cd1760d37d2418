"""The GPT layer spec: megatron-core's local (non-Transformer-Engine) modules with the kernel seams open.

``layer_spec(kernels)`` mirrors ``megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec`` for a dense
RMSNorm/SwiGLU/RoPE decoder, but takes the norm, core attention and MLP activation from a ``KernelSet``
(``aquila_npu.kernels``); the set's ``config_overrides()`` are the ``TransformerConfig`` fields it needs beside.
Self-attention is megatron-core's with rotated keys in the static KV cache (``aquila_npu.kv_cache``); the linears
are megatron-core's, taking the bare product when there is nothing to parallelise or differentiate
(``aquila_npu.parallel_linears``).

Megatron-LM's ``pretrain_gpt.py`` reads a layer spec through ``--spec MODULE NAME``; the start-up hook passes
``--spec aquila_npu.megatron_lm.layer_spec layer_spec`` (the spec for the device selected in this process).
"""

from __future__ import annotations

from aquila_npu.kernels.seams import KernelSet


def layer_spec(kernels: KernelSet):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from aquila_npu.kv_cache import RotatedKeyCacheSelfAttention
    from aquila_npu.parallel_linears import ColumnParallelLinear, RowParallelLinear

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=kernels.rms_norm.load(),
            self_attention=ModuleSpec(
                module=RotatedKeyCacheSelfAttention,  # keys enter the static KV cache rotated
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=kernels.attention.load(),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=kernels.rms_norm.load(),
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear,
                    linear_fc2=RowParallelLinear,
                    activation_func=kernels.swiglu.load(),
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            # same checkpoint keys as the Transformer Engine spec, so torch_dist checkpoints load under either
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def block_spec(kernels: KernelSet, config, vp_stage: int | None = None):
    """The decoder block for this pipeline stage: ``layer_spec`` repeated, and the final norm from the kernels
    too (given only a layer spec, megatron-core would take its module-level default norm, which supports neither
    sequence parallelism nor the device's kernel)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = layer_spec(kernels)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=kernels.rms_norm.load())

