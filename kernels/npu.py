"""Ascend NPU kernels over torch_npu's fused operators, as MindSpeed/ModelLink call them.

Each function has the reference's signature (``aquila_npu.kernels.reference``) and calls the documented torch_npu
operator. The conventions they rely on — checked by the contract tests against a stand-in ``torch_npu`` that
implements the signatures with reference math, since no NPU is available to this project:

* ``npu_rms_norm(x, gamma, epsilon=eps)`` returns ``(y, rstd)``: take ``[0]``;
* ``npu_rotary_mul(t, cos, sin)``: rotate-half RoPE on 4-D ``t`` with broadcastable ``cos``/``sin``;
* ``npu_fusion_attention(q, k, v, head_num, "SBH", atten_mask=..., scale=..., pre_tockens=..., next_tockens=0,
  keep_prob=...)`` returns a tuple whose ``[0]`` is the output: layout ``SBH`` is ``[s, b, heads * d]`` for the
  query and ``[s, b, groups * d]`` for key and value (GQA native); ``head_num`` counts the query heads;
  ``atten_mask`` is boolean with True = masked, ``[sq, sk]`` (or ``[b, 1, sq, sk]`` with padding); with
  ``pre_tockens``/``next_tockens`` it bounds the keys a query sees (``next_tockens=0``: causal, as MindSpeed trains);
  ``keep_prob`` 1.0 is no dropout;
* ``npu_swiglu(x, dim=-1)``: ``silu`` of the first half times the second half along ``dim``.
"""

from __future__ import annotations

import torch

from aquila_npu.kernels.reference import CoreAttention, RMSNorm, causal_mask

# pre_tockens: how many earlier tokens a query may attend to; "all of them" as MindSpeed passes it
ALL_PREVIOUS_TOKENS = 65536


def _torch_npu():
    import torch_npu

    return torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _torch_npu().npu_rotary_mul(t, cos, sin)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    sq, b, heads, d = query.shape
    sk = key.shape[0]
    if mask is None and sq == sk:  # training: MindSpeed's call, causal through next_tockens=0
        atten_mask, next_tokens = causal_mask(sq, sk, query.device), 0
    else:  # a given mask (padding), or queries at the end of a KV cache: the mask alone decides
        atten_mask = causal_mask(sq, sk, query.device) if mask is None else mask
        next_tokens = ALL_PREVIOUS_TOKENS
    out = _torch_npu().npu_fusion_attention(
        query.reshape(sq, b, heads * d), key.reshape(sk, b, -1), value.reshape(sk, b, -1), heads, "SBH",
        atten_mask=atten_mask, scale=scale, pre_tockens=ALL_PREVIOUS_TOKENS, next_tockens=next_tokens, keep_prob=1.0)[0]
    return out.reshape(sq, b, heads, d)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return _torch_npu().npu_swiglu(x, dim=-1)


# ---------------------------------------------------------------------------------------- layer-spec modules
class NpuRMSNorm(RMSNorm):
    """The reference ``RMSNorm`` module (its weight marked for sequence parallelism) computing with
    ``npu_rms_norm``."""

    kernel = staticmethod(rms_norm)


class NpuSwiGLU(torch.nn.Module):
    """megatron-core's MLP activation module (``use_te_activation_func``): the whole gated activation."""

    def __init__(self, config=None, **_unused) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class NpuFlashAttention(CoreAttention):
    """megatron-core core attention over ``npu_fusion_attention``."""

    kernel = staticmethod(attention)
