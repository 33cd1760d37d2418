"""A stand-in ``flash_attn`` for the contract test of ``aquila_npu.kernels.flash`` (flash-attn needs a GPU and a
CUDA build): ``flash_attn_func`` with flash-attn 2's signature and conventions, computed with plain PyTorch, and
asserting them — ``[b, s, heads, d]`` inputs of one half dtype, key/value heads dividing the query heads, a head
dimension of at most 256, causal masking aligned to the end of the keys."""

from __future__ import annotations

import torch

calls: list[str] = []


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    calls.append("flash_attn_func")
    assert q.dim() == k.dim() == v.dim() == 4, "q, k, v are [batch, seqlen, nheads, headdim]"
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype, "fp16 or bf16 only"
    assert k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3] <= 256
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "the head dimension must be contiguous"
    assert q.shape[2] % k.shape[2] == 0, "query heads must be a multiple of key/value heads"
    assert dropout_p == 0.0 and alibi_slopes is None and not return_attn_probs
    b, sq, heads, d = q.shape
    sk, groups = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qh = q.permute(0, 2, 1, 3).float()
    kh = k.permute(0, 2, 1, 3).float().repeat_interleave(heads // groups, dim=1)
    vh = v.permute(0, 2, 1, 3).float().repeat_interleave(heads // groups, dim=1)
    scores = qh @ kh.transpose(-1, -2) * scale
    if causal:  # bottom-right: query i sees keys up to i + sk - sq
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1 + sk - sq), float("-inf"))
    return (scores.softmax(-1) @ vh).to(q.dtype).permute(0, 2, 1, 3)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2's variable-length entry point: ``[total, heads, d]`` inputs, documents by int32 cumulative
    lengths ``[batch + 1]``, ``max_seqlen_*`` at least every document's length."""
    calls.append("flash_attn_varlen_func")
    assert q.dim() == k.dim() == v.dim() == 3, "q, k, v are [total, nheads, headdim]"
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype, "fp16 or bf16 only"
    assert k.shape == v.shape and q.shape[2] == k.shape[2] <= 256 and q.shape[1] % k.shape[1] == 0
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and cu_seqlens_q.dim() == 1
    assert cu_seqlens_q.shape == cu_seqlens_k.shape, "as many key documents as query documents"
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    assert int(cu_seqlens_q.diff().max()) <= max_seqlen_q and int(cu_seqlens_k.diff().max()) <= max_seqlen_k
    assert dropout_p == 0.0 and alibi_slopes is None and not return_attn_probs and block_table is None
    pieces = []
    for i in range(len(cu_seqlens_q) - 1):
        (q0, q1), (k0, k1) = cu_seqlens_q[i:i + 2].tolist(), cu_seqlens_k[i:i + 2].tolist()
        pieces.append(flash_attn_func(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale=softmax_scale,
                                      causal=causal)[0])
        calls.pop()  # one document's flash_attn_func is part of this call
    return torch.cat(pieces)
