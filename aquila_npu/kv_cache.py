"""Self-attention whose static KV cache holds keys already rotated.

megatron-core's static-batching inference stores the keys *before* rotary embedding and, at every step, rotates
the whole cache again (``Attention._adjust_key_value_for_inference`` returns the cache and the angle table up to the
current position; ``forward`` then applies RoPE to all of it), so a decode step costs more the longer the cache.
``RotatedKeyCacheSelfAttention`` — the layer spec's ``self_attention`` module, on our driver and on Megatron-LM's
scripts alike — rotates each key once, with its own slot's angles, before it enters the cache, and hands
``forward`` no key angles, so a step rotates only its own new keys. The values are the same either way (the same
elementwise rotation of the same key with the same angles); the per-row angle tables of left-padded batches
(``aquila_npu.generate.batching``) slice along the sequence just the same. Training, dynamic batching and
megatron-core's flash-decode path (which already caches rotated keys) are megatron-core's own.
"""

from __future__ import annotations

from megatron.core.transformer import attention as megatron_attention
from megatron.core.utils import deprecate_inference_params


class RotatedKeyCacheSelfAttention(megatron_attention.SelfAttention):
    """megatron-core's ``SelfAttention``; with a static KV cache, keys are cached rotated (see the module doc)."""

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
        key = megatron_attention.apply_rotary_pos_emb(
            key, k_pos_emb[start:start + key.size(0)], config=self.config, cu_seqlens=None,
            mscale=megatron_attention._yarn_get_concentration_factor_from_config(self.config),
            cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            context, query, key, value, (q_pos_emb, k_pos_emb), rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset)
        return query, key, value, (q_pos_emb, None), mask_type, block_table
