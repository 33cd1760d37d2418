"""megatron-core's own core attention, the reference path's: ``DotProductAttention``, unchanged for ordinary
batches, plus packed sequences (``qkv_format='thd'``), which megatron-core leaves to Transformer Engine and refuses
here; those compute with the reference's block-diagonal document mask (``reference.packed_attention``)."""

from __future__ import annotations

from aquila_npu.kernels.reference import packed_arguments, packed_attention
from megatron.core.transformer.dot_product_attention import (
    DotProductAttention as _DotProductAttention,
)


class DotProductAttention(_DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if attention_bias is not None:
            raise ValueError("DotProductAttention: attention bias is not supported")
        # [t, heads, d] in; [t, heads * d] out (megatron-core adds the batch of 1)
        out = packed_attention(query, key, value, self.softmax_scale, *packed_arguments(packed_seq_params))
        return out.reshape(out.shape[0], -1)
