"""Ascend NPU kernels over torch_npu's fused operators, as MindSpeed/ModelLink call them.

Each function has the reference's signature (``aquila_npu.kernels.reference``) and calls the documented torch_npu
operator. The conventions they rely on — checked by the contract tests against a stand-in ``torch_npu`` that
implements the signatures with reference math, since no NPU is available to this project:

* ``npu_rms_norm(x, gamma, epsilon=eps)`` returns ``(y, rstd)``: take ``[0]``;
* ``npu_rotary_mul(t, cos, sin)``: rotate-half RoPE on 4-D ``t`` with broadcastable ``cos``/``sin``;
* ``npu_fusion_attention(q, k, v, head_num, "SBH", atten_mask=..., scale=..., pre_tockens=..., next_tockens=0,
  keep_prob=...)`` returns a tuple whose ``[0]`` is the output: layout ``SBH`` is ``[s, b, heads * d]`` for the
  query and ``[s, b, groups * d]`` for key and value (GQA native); ``head_num`` counts the query heads;
  ``atten_mask`` is boolean with True = masked, ``[s, s]`` (or ``[b, 1, s, s]`` with padding); ``next_tockens=0``
  makes it causal; ``keep_prob`` 1.0 is no dropout;
* ``npu_swiglu(x, dim=-1)``: ``silu`` of the first half times the second half along ``dim``.
"""

from __future__ import annotations

import torch

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
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    s, b, heads, d = query.shape
    mask = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    if key_padding_mask is not None:
        mask = mask[None, None] | key_padding_mask[:, None, None, :]
    out = _torch_npu().npu_fusion_attention(
        query.reshape(s, b, heads * d), key.reshape(s, b, -1), value.reshape(s, b, -1), heads, "SBH",
        atten_mask=mask, scale=scale, pre_tockens=ALL_PREVIOUS_TOKENS, next_tockens=0, keep_prob=1.0)[0]
    return out.reshape(s, b, heads, d)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return _torch_npu().npu_swiglu(x, dim=-1)
