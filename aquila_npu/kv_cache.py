"""Self-attention whose static KV cache holds keys already rotated, with the rotary cosines computed once a table.

megatron-core's static-batching inference stores the keys *before* rotary embedding and, at every step, rotates
the whole cache again (``Attention._adjust_key_value_for_inference`` returns the cache and the angle table up to the
current position; ``forward`` then applies RoPE to all of it), so a decode step costs more the longer the cache.
``RotatedKeyCacheSelfAttention`` — the layer spec's ``self_attention`` module, on our driver and on Megatron-LM's
scripts alike — rotates each new query and key with its own slot's angles before the key enters the cache, and hands
``forward`` no angles, so a step rotates only its own positions.

It also takes the cosine and sine of the angle table once per table rather than at each rotation: megatron-core's
unfused RoPE computes ``cos``/``sin`` of the angles at every call, for queries and keys, in every layer, although a
generation's table is one tensor for all its steps (megatron-core caches it per length, and the per-row tables of
left-padded batches, ``aquila_npu.generate.batching``, are built once a batch). The values are megatron-core's bit
for bit: the same elementwise operations on the same angles and inputs (``tests/test_generate.py``).

Training, dynamic batching, megatron-core's flash-decode path (which already caches rotated keys) and fused RoPE
(``apply_rope_fusion``: the NPU's ``npu_rotary_mul``, Transformer Engine's) are megatron-core's own, except that a
fused-RoPE static cache still gets its keys rotated once, through megatron-core's ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import attention as megatron_attention
from megatron.core.utils import deprecate_inference_params

from aquila_npu.kernels.reference import apply_rotary


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (non-interleaved) of ``t`` ``[s, b, heads, d]`` by the ``cos``/``sin`` of its angles ``[s, b|1, 1,
    d_rot]``: megatron-core's ``_apply_rotary_pos_emb_bshd`` after its ``cos``/``sin``."""
    rot_dim = cos.shape[-1]
    return torch.cat((apply_rotary(t[..., :rot_dim], cos, sin), t[..., rot_dim:]), dim=-1)


class RotatedKeyCacheSelfAttention(megatron_attention.SelfAttention):
    """megatron-core's ``SelfAttention``; with a static KV cache, queries and keys are rotated before the cache,
    keys are cached rotated, and the angles' cosines are taken once a table (see the module doc)."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        context = deprecate_inference_params(inference_context, inference_params)
        if (context is None or not context.is_static_batching() or rotary_pos_emb is None
                or self.config.flash_decode):
            return super()._adjust_key_value_for_inference(context, query, key, value, rotary_pos_emb,
                                                           rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                                                           sequence_len_offset)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = context.sequence_len_offset
        positions = slice(start, start + key.size(0))
        if self._rotates_with_cached_cosines(q_pos_emb, k_pos_emb):
            cos, sin = (table[positions] for table in self._cosines(context, k_pos_emb, key.dtype))
            key, query = rotate(key, cos, sin), rotate(query, cos, sin)
            angles = None  # forward rotates nothing more
        else:
            key = megatron_attention.apply_rotary_pos_emb(
                key, k_pos_emb[positions], config=self.config, cu_seqlens=None, mscale=self._mscale(),
                cp_group=self.pg_collection.cp)
            angles = (q_pos_emb, k_pos_emb)
        query, key, value, angles, mask_type, block_table = super()._adjust_key_value_for_inference(
            context, query, key, value, angles, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset)
        if angles is not None:
            angles = (angles[0], None)  # the cached keys are rotated; forward rotates the query only
        return query, key, value, angles, mask_type, block_table

    def _mscale(self) -> float:
        return megatron_attention._yarn_get_concentration_factor_from_config(self.config)

    def _rotates_with_cached_cosines(self, q_pos_emb, k_pos_emb) -> bool:
        # megatron-core's unfused, non-interleaved bshd RoPE is what `rotate` reproduces; anything else is its own
        config = self.config
        return (q_pos_emb is k_pos_emb and not config.apply_rope_fusion and not config.rotary_interleaved
                and not config.multi_latent_attention)

    def _cosines(self, context, table: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` of the angle ``table`` (times the YaRN scale, in the activations' dtype, as megatron-core
        takes them), computed once per table and dtype and kept on the inference context (holding the table, so that
        its identity stays its own)."""
        cached = getattr(context, "_aquila_npu_rotary_cosines", None)
        if cached is None or cached[0] is not table or cached[1].dtype != dtype:
            mscale = self._mscale()
            cached = (table, (torch.cos(table) * mscale).to(dtype), (torch.sin(table) * mscale).to(dtype))
            context._aquila_npu_rotary_cosines = cached
        return cached[1], cached[2]
