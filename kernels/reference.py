"""Plain-PyTorch reference kernels (forward and backward by autograd)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Aquila2/Llama compute it: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm module for megatron-core layer specs.

    Unlike megatron-core's ``WrappedTorchNorm`` it supports ``--sequence-parallel``: its weight is marked
    ``sequence_parallel`` so megatron-core all-reduces its gradient over the tensor-parallel group
    (``finalize_model_grads``), as Transformer Engine's and Apex's norms do. Subclasses set ``kernel`` (a function
    with ``rms_norm``'s signature).
    """

    kernel = staticmethod(rms_norm)

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.config = config
        self.eps = eps
        # where megatron-core's own layers put their weights (torch_npu's bridge maps torch.cuda to the NPU)
        on_accelerator = not config.use_cpu_initialization and torch.cuda.is_available()
        device = torch.cuda.current_device() if on_accelerator else "cpu"
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Aquila2/Llama): ``t * cos + rotate_half(t) * sin``. ``t`` is ``[s, b, n, d]`` (sbhd) or
    ``[b, s, n, d]`` (bshd); ``cos``/``sin`` broadcast to it (``[s, 1, 1, d]`` or ``[1, s, 1, d]``)."""
    return t * cos + rotate_half(t) * sin


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """``[q_len, k_len]``, True where masked: each query sees the keys up to its own position, the queries being the
    last ``q_len`` positions of the ``k_len`` (decoding with a KV cache: one query sees every key)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(1 + k_len - q_len)


def document_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor) -> torch.Tensor:
    """``[tq, tk]``, True where masked, for packed (``thd``) sequences: a query sees only the keys of its own
    document, causally (aligned to the end of the document's keys, as ``causal_mask``). ``cu_seqlens_*`` are the
    cumulative document lengths ``[0, l1, l1 + l2, ..., t]`` (megatron-core's ``PackedSeqParams``)."""
    cu_q, cu_kv = cu_seqlens_q.long().reshape(-1), cu_seqlens_kv.long().reshape(-1)
    len_q, len_kv = cu_q.diff(), cu_kv.diff()
    docs = torch.arange(len(len_q), device=cu_q.device)
    doc_q, doc_kv = docs.repeat_interleave(len_q), docs.repeat_interleave(len_kv)
    # position from the end of its document: a query sees the keys no further from their end than it is from its own
    from_end_q = cu_q[1:].repeat_interleave(len_q) - torch.arange(int(cu_q[-1]), device=cu_q.device)
    from_end_kv = cu_kv[1:].repeat_interleave(len_kv) - torch.arange(int(cu_kv[-1]), device=cu_q.device)
    return (doc_q[:, None] != doc_kv[None, :]) | (from_end_kv[None, :] < from_end_q[:, None])


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention, layout sbhd: ``query`` ``[sq, b, heads, d]``, ``key``/``value`` ``[sk, b, groups, d]`` (GQA:
    ``heads`` a multiple of ``groups``). ``mask``: boolean, True where masked, broadcasting to ``[b, heads, sq, sk]``
    (``[b, 1, sq, sk]``: padding); None means causal (``causal_mask``). Returns ``[sq, b, heads, d]``; softmax in
    fp32; a fully masked query gives zeros."""
    sq, b, heads, d = query.shape
    groups = key.shape[2]
    if groups != heads:
        key = key.repeat_interleave(heads // groups, dim=2)
        value = value.repeat_interleave(heads // groups, dim=2)
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is None:
        mask = causal_mask(sq, key.shape[0], query.device)
    probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(value.dtype), v).permute(2, 0, 1, 3)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, max_seqlen_q: int | None = None,
                     max_seqlen_kv: int | None = None) -> torch.Tensor:
    """Attention over packed documents, layout thd (megatron-core's ``qkv_format='thd'``): ``query`` ``[tq, heads,
    d]``, ``key``/``value`` ``[tk, groups, d]``; each document attends causally to itself only
    (``document_mask``, dense). Returns ``[tq, heads, d]``."""
    mask = document_mask(cu_seqlens_q, cu_seqlens_kv)
    return attention(query[:, None], key[:, None], value[:, None], scale, mask[None, None])[:, 0]


def packed_arguments(packed_seq_params) -> tuple:
    """``(cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv)`` of megatron-core's ``PackedSeqParams``: the
    padded boundaries where given (they describe the tensors' layout), else the plain ones."""
    if packed_seq_params.qkv_format != "thd":
        raise ValueError(f"packed sequences in layout {packed_seq_params.qkv_format!r}: only 'thd' is supported")
    p = packed_seq_params
    cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
    cu_kv = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
    return cu_q, cu_kv, p.max_seqlen_q, p.max_seqlen_kv


class CoreAttention(torch.nn.Module):
    """megatron-core core attention (``DotProductAttention``'s constructor and forward) over an attention function
    with ``attention``'s signature: ``[sq, b, heads, d]`` in, ``[sq, b, heads * d]`` out. Subclasses set ``kernel``
    and, where the device has a separate operator for inference (generation, evaluation: the model in eval mode with
    autograd off), ``inference_kernel``; packed sequences (``packed_seq_params``, layout thd: ``--reset-attention-mask``
    training on packed data) go to ``packed_kernel`` (``packed_attention``'s signature). This one computes with the
    reference."""

    kernel = staticmethod(attention)
    inference_kernel = None
    packed_kernel = staticmethod(packed_attention)

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_unused) -> None:
        super().__init__()
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
            raise ValueError(f"{type(self).__name__}: attention dropout is not supported (Aquila2 trains without)")
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__}: attention bias is not supported")
        if packed_seq_params is not None:  # [t, heads, d] in; [t, heads * d] out (megatron-core adds the batch of 1)
            out = self.packed_kernel(query, key, value, self.scale, *packed_arguments(packed_seq_params))
            return out.reshape(out.shape[0], -1)
        # megatron-core's masks are boolean, True = masked; anything else here is its causal default
        mask = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
        inference = self.inference_kernel is not None and not self.training and not torch.is_grad_enabled()
        out = (self.inference_kernel if inference else self.kernel)(query, key, value, self.scale, mask)
        return out.reshape(out.shape[0], out.shape[1], -1)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on megatron-core's fused ``linear_fc1`` output ``[..., 2 * ffn]`` (gate, then up): ``silu(gate) * up``."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
