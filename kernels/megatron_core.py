"""megatron-core's own core attention, the reference path's: ``DotProductAttention``, unchanged for training, plus

* packed sequences (``qkv_format='thd'``), which megatron-core leaves to Transformer Engine and refuses here; those
  compute with the reference's block-diagonal document mask (``reference.packed_attention``);
* grouped-query attention without autograd (generation, evaluation): megatron-core repeats each key/value head for
  its query heads (``repeat_interleave``), which during generation copies the whole KV cache twice a layer at every
  step, so a decode step costs more the longer the cache, beyond attention itself. Here each group's queries are
  stacked and multiplied with its key/value head where it lies (a strided view of the cache), through the same
  batched products, scale, mask and softmax as megatron-core's.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import (
    DotProductAttention as _DotProductAttention,
)

from aquila_npu.kernels.reference import packed_arguments, packed_attention


class DotProductAttention(_DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            if attention_bias is not None:
                raise ValueError("DotProductAttention: attention bias is not supported")
            # [t, heads, d] in; [t, heads * d] out (megatron-core adds the batch of 1)
            out = packed_attention(query, key, value, self.softmax_scale, *packed_arguments(packed_seq_params))
            return out.reshape(out.shape[0], -1)
        if self._groups_in_place(query, key, attention_bias):
            return self._grouped_forward(query, key, value, attention_mask)
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias)

    def _groups_in_place(self, query, key, attention_bias) -> bool:
        # no autograd and no dropout: megatron-core's forward differs from this one only in its copies
        return (query.size(2) != key.size(2) and attention_bias is None and not torch.is_grad_enabled()
                and not (self.training and self.attention_dropout.p > 0))

    def _grouped_forward(self, query, key, value, attention_mask):
        """megatron-core's ``forward`` for ``query`` ``[sq, b, np, hn]`` and ``key``/``value`` ``[sk, b, ng, hn]``
        with each key/value head shared by ``np // ng`` consecutive query heads, as its ``repeat_interleave`` pairs
        them, without that copy: the products are batched over ``b * ng`` with the group's ``np // ng * sq`` query
        rows stacked, which holds the same dot products as megatron-core's batch of ``b * np``."""
        sq, b, heads, hn = query.shape
        sk, groups = key.size(0), key.size(2)
        per_group = heads // groups
        # [sq, b, ng, g, hn] -> [b * ng, g * sq, hn] (a copy of the queries only: one row a head at decode)
        stacked = query.reshape(sq, b, groups, per_group, hn).permute(1, 2, 3, 0, 4).reshape(b * groups, -1, hn)
        # [sk, b, ng, hn] -> [b * ng, hn, sk] and [b * ng, sk, hn]: views (b and ng are adjacent in the cache)
        keys = key.reshape(sk, b * groups, hn).permute(1, 2, 0)
        values = value.reshape(sk, b * groups, hn).transpose(0, 1)
        # beta=0 ignores the (0-d, broadcast) input, as megatron-core's preallocated one
        scores = torch.baddbmm(query.new_empty(()), stacked, keys, beta=0.0, alpha=self.softmax_scale)
        # no dropout: `_groups_in_place` holds only where megatron-core's would be the identity
        probs = self.scale_mask_softmax(scores.view(b, heads, sq, sk), attention_mask, self.softmax_offset)
        context = torch.bmm(probs.view(b * groups, per_group * sq, sk), values)  # [b * ng, g * sq, hn]
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.view(b, heads, sq, hn).permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
