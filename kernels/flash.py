"""flash-attn's ``flash_attn_func`` (Dao-AILab/flash-attention 2.x): the CUDA device's attention when the package
is installed.

It takes ``[b, s, heads, d]`` fp16/bf16 CUDA tensors, GQA native (key/value with fewer heads), causal aligned to the
end of the keys (flash-attn >= 2.1, as decoding with a KV cache needs) — and no arbitrary mask. Calls with a mask
(left-padded generation batches) and fp32 calls go to PyTorch's SDPA (``aquila_npu.kernels.pytorch``). Packed
documents (layout thd) go to its variable-length entry point, ``flash_attn_varlen_func`` (cumulative lengths, causal
within each document).
"""

from __future__ import annotations

import torch

from aquila_npu.kernels import pytorch
from aquila_npu.kernels.reference import CoreAttention

HALF = (torch.float16, torch.bfloat16)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is not None or query.dtype not in HALF:
        return pytorch.attention(query, key, value, scale, mask)
    from flash_attn import flash_attn_func

    # sbhd -> bshd is a transpose of the two outer dimensions: the head dimension stays contiguous, as flash-attn needs
    out = flash_attn_func(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), dropout_p=0.0,
                          softmax_scale=scale, causal=True)
    return out.transpose(0, 1)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, max_seqlen_q: int | None = None,
                     max_seqlen_kv: int | None = None) -> torch.Tensor:
    if query.dtype not in HALF:
        return pytorch.packed_attention(query, key, value, scale, cu_seqlens_q, cu_seqlens_kv)
    from flash_attn import flash_attn_varlen_func

    cu_q, cu_kv = (c.reshape(-1).to(torch.int32) for c in (cu_seqlens_q, cu_seqlens_kv))
    longest_q = max_seqlen_q if max_seqlen_q is not None else int(cu_q.diff().max())
    longest_kv = max_seqlen_kv if max_seqlen_kv is not None else int(cu_kv.diff().max())
    return flash_attn_varlen_func(query, key, value, cu_q, cu_kv, longest_q, longest_kv, dropout_p=0.0,
                                  softmax_scale=scale, causal=True)


class FlashAttnAttention(CoreAttention):
    """megatron-core core attention over ``flash_attn_func`` (``flash_attn_varlen_func`` for packed documents)."""

    kernel = staticmethod(attention)
    packed_kernel = staticmethod(packed_attention)
