"""PyTorch's own fused operators, for CUDA (and, asked for, the CPU): ``torch.nn.functional.rms_norm`` and
``scaled_dot_product_attention``.

On CUDA, SDPA dispatches a causal, unmasked fp16/bf16 call to its FlashAttention-2 backend (the memory-efficient
one otherwise); on the CPU it has a flash-attention kernel of its own. GQA is native (``enable_gqa``), so key and
value heads are not repeated in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aquila_npu.kernels.reference import CoreAttention, RMSNorm, causal_mask, document_mask


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32 whatever the input dtype, as the reference (PyTorch's kernels accumulate in fp32)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    sq, sk = query.shape[0], key.shape[0]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
    gqa = key.shape[2] != query.shape[2]
    if mask is None and sq == sk:  # training: SDPA's own causal mask (lets CUDA take the flash backend)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # SDPA's boolean mask is True where attention is *allowed*: the opposite of megatron-core's
        allowed = ~(causal_mask(sq, sk, query.device) if mask is None else mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
        out = out.nan_to_num(0.0)  # a fully masked query gives zeros, as the reference
    return out.permute(2, 0, 1, 3)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, max_seqlen_q: int | None = None,
                     max_seqlen_kv: int | None = None) -> torch.Tensor:
    """Packed documents (layout thd, ``[t, heads, d]``): SDPA with the block-diagonal document mask (its
    memory-efficient backend on CUDA; SDPA has no variable-length entry point)."""
    allowed = ~document_mask(cu_seqlens_q, cu_seqlens_kv)
    q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))  # [1, heads, t, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out[0].permute(1, 0, 2)


class TorchRMSNorm(RMSNorm):
    """The reference ``RMSNorm`` module (its weight marked for sequence parallelism) computing with
    ``torch.nn.functional.rms_norm``."""

    kernel = staticmethod(rms_norm)


class SdpaAttention(CoreAttention):
    """megatron-core core attention over ``scaled_dot_product_attention``."""

    kernel = staticmethod(attention)
    packed_kernel = staticmethod(packed_attention)
