"""Ascend NPU kernels over torch_npu's fused operators, called as torch_npu 2.13.0 documents them.

Each function has the reference's signature (``aquila_npu.kernels.reference``). What each call relies on, from the
operator's schema (``npu_native_functions_by_codegen.yaml``) and docstring (``_op_plugin_docs.py``) in the torch_npu
wheel — the contract tests hold a stand-in to exactly these, read from the real wheel (tests/torch_npu_wheel.py):

* ``npu_rms_norm(x, gamma, epsilon=eps)`` returns ``(y, rstd)``; gamma must have x's dtype;
* ``npu_rotary_mul(t, r1, r2)``, rotary_mode 'half' (rotate-half RoPE): ``t`` 4-D (SBND or BSND), ``r1``/``r2``
  S11D / SB1D / SBND (1S1D / BS1D / BSND); D even and below 896, B and N below 1000. Outside those limits the
  reference computes (same formula, plain ops);
* ``npu_fusion_attention`` — **training only**, as its docstring says. Causal is ``next_tockens=0`` with
  ``pre_tockens >= Sq`` (the default 2147483647) and the lower-triangular mask; any other mask (padding, packed
  documents) goes as ``sparse_mode=1`` (allMask: the full mask, no window) with ``inner_precise=2``, the documented
  correction for rows the mask removes entirely. Layout SBH, GQA native (``head_num`` counts query heads), the mask
  boolean with True = not attended, shaped BNSS / B1SS / 11SS / SS. Packed documents (megatron-core's thd) go as
  layout TND with ``actual_seq_qlen`` / ``actual_seq_kvlen`` (cumulative lengths, "required" with TND) and
  ``sparse_mode=3`` (rightDownCausal: causal within each document) over the operator's compressed causal mask, 2048 x
  2048, True above the diagonal (as ``transformers.integrations.npu_flash_attention`` passes it); at most 1K
  documents a call (more: the reference computes);
* ``npu_fused_infer_attention_score`` — the inference operator, for prefill (Q_S > 1) and decode steps against the
  KV cache (Q_S = 1), chosen by the attention module when the model runs without autograd (``infer_attention``).
  Layout BSND (contiguous), ``num_heads`` / ``num_key_value_heads`` for GQA, the mask (B,1,Q_S,KV_S) or
  (1,1,Q_S,KV_S); Q_S > 1 with a mask: ``sparse_mode=1`` and ``inner_precise=2`` (the docstring advises the
  invalid-row correction for user masks); Q_S = 1: the window and sparse mode do not apply, ``inner_precise`` 0.
  It takes float16 / bfloat16 with D a multiple of 16; anything else (fp32 inference) computes with the reference;
* ``npu_swiglu(x, dim=-1)``: ``silu`` of the first half times the second half along ``dim``.
"""

from __future__ import annotations

import torch

from aquila_npu.kernels import reference
from aquila_npu.kernels.reference import CoreAttention, RMSNorm, causal_mask

# sparse_mode values of torch_npu's attention operators
SPARSE_DEFAULT_MASK = 0  # the mask plus the pre/next window
SPARSE_ALL_MASK = 1  # the full mask as given; the window is ignored
SPARSE_RIGHT_DOWN_CAUSAL = 3  # causal aligned to the bottom right, per document with TND; a compressed mask
COMPRESSED_MASK_SIZE = 2048  # the compressed causal mask of sparse modes 2-4: 2048 x 2048
VARLEN_MAX_DOCUMENTS = 1024  # TND: actual_seq_qlen holds at most 1K lengths
# inner_precise: high precision with the correction of rows the mask removes entirely ("invalid rows")
INVALID_ROW_CORRECTION = 2
# npu_rotary_mul's limits (half mode): D even and below 896; B and N below 1000
ROTARY_MAX_HEAD_DIM, ROTARY_MAX_BATCH_OR_HEADS = 896, 1000
# npu_fused_infer_attention_score: its dtypes, and D aligned to 16 for them
INFER_DTYPES = (torch.float16, torch.bfloat16)
INFER_HEAD_DIM_ALIGNMENT = 16


def _torch_npu():
    import torch_npu

    return torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, weight.dtype)  # gamma must have x's dtype
    return _torch_npu().npu_rms_norm(x.to(dtype), weight.to(dtype), epsilon=eps)[0]


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d, heads = t.shape[-1], t.shape[2]
    # B of t: SBND when cos runs along t's first dimension (S11D, SB1D, SBND), else BSND (conservative either way)
    batch = t.shape[1] if cos.shape[0] == t.shape[0] > 1 else t.shape[0]
    if d % 2 or d >= ROTARY_MAX_HEAD_DIM or max(batch, heads) >= ROTARY_MAX_BATCH_OR_HEADS:
        return reference.apply_rotary(t, cos, sin)
    return _torch_npu().npu_rotary_mul(t, cos, sin)


def _full_mask(mask: torch.Tensor | None, sq: int, sk: int, device) -> torch.Tensor:
    """The mask as a contiguous 4-D boolean tensor; None: causal, the queries being the last ``sq`` of ``sk``."""
    if mask is None:
        mask = causal_mask(sq, sk, device)
    if mask.dim() == 2:
        mask = mask[None, None]
    return mask.contiguous()


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Training attention (``npu_fusion_attention``), layout SBH."""
    sq, b, heads, d = query.shape
    sk = key.shape[0]
    if mask is None and sq == sk:  # causal, as documented: next_tockens=0, pre_tockens >= Sq (its default)
        window = dict(atten_mask=causal_mask(sq, sk, query.device), next_tockens=0)
    else:  # any other mask, whole: allMask, with the correction of rows it removes entirely
        window = dict(atten_mask=_full_mask(mask, sq, sk, query.device), sparse_mode=SPARSE_ALL_MASK,
                      inner_precise=INVALID_ROW_CORRECTION)
    out = _torch_npu().npu_fusion_attention(
        query.reshape(sq, b, heads * d), key.reshape(sk, b, -1), value.reshape(sk, b, -1), heads, "SBH",
        scale=scale, keep_prob=1.0, **window)[0]
    return out.reshape(sq, b, heads, d)


_compressed_masks: dict = {}


def _compressed_causal_mask(device) -> torch.Tensor:
    key = str(device)
    if key not in _compressed_masks:
        _compressed_masks[key] = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool,
                                            device=device).triu(1)
    return _compressed_masks[key]


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, max_seqlen_q: int | None = None,
                     max_seqlen_kv: int | None = None) -> torch.Tensor:
    """Training attention over packed documents (``npu_fusion_attention``, layout TND): ``[t, heads, d]``."""
    ends_q = [int(x) for x in cu_seqlens_q.reshape(-1)[1:].tolist()]
    ends_kv = [int(x) for x in cu_seqlens_kv.reshape(-1)[1:].tolist()]
    if len(ends_q) > VARLEN_MAX_DOCUMENTS:
        return reference.packed_attention(query, key, value, scale, cu_seqlens_q, cu_seqlens_kv)
    return _torch_npu().npu_fusion_attention(
        query, key, value, query.shape[1], "TND", atten_mask=_compressed_causal_mask(query.device), scale=scale,
        keep_prob=1.0, actual_seq_qlen=ends_q, actual_seq_kvlen=ends_kv, sparse_mode=SPARSE_RIGHT_DOWN_CAUSAL)[0]


def infer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Inference attention (``npu_fused_infer_attention_score``): prefill, and decode steps against the KV cache;
    layout BSND."""
    sq, b, heads, d = query.shape
    sk, groups = key.shape[0], key.shape[2]
    if query.dtype not in INFER_DTYPES or d % INFER_HEAD_DIM_ALIGNMENT:
        return reference.attention(query, key, value, scale, mask)
    atten_mask = _full_mask(mask, sq, sk, query.device)
    if sq > 1:  # prefill: the full mask, the invalid-row correction the docstring advises for a user mask
        mode = dict(sparse_mode=SPARSE_ALL_MASK, inner_precise=INVALID_ROW_CORRECTION)
    else:  # a decode step: sparse mode and window do not apply, and only inner_precise 0 / 1 do
        mode = dict(sparse_mode=SPARSE_DEFAULT_MASK, inner_precise=0)
    q, k, v = (x.transpose(0, 1).contiguous() for x in (query, key, value))  # [b, s, n, d]
    out = _torch_npu().npu_fused_infer_attention_score(
        q, k, v, atten_mask=atten_mask, num_heads=heads, num_key_value_heads=groups, input_layout="BSND",
        scale=scale, **mode)[0]
    return out.transpose(0, 1)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return _torch_npu().npu_swiglu(x, dim=-1)


# ---------------------------------------------------------------------------------------- layer-spec modules
class NpuRMSNorm(RMSNorm):
    """The reference ``RMSNorm`` module (its weight marked for sequence parallelism) computing with
    ``npu_rms_norm``."""

    kernel = staticmethod(rms_norm)


class NpuSwiGLU(torch.nn.Module):
    """megatron-core's MLP activation module (``use_te_activation_func``): the whole gated activation."""

    kernel = staticmethod(swiglu)

    def __init__(self, config=None, **_unused) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class NpuFlashAttention(CoreAttention):
    """megatron-core core attention: ``npu_fusion_attention`` in training (layout TND for packed documents),
    ``npu_fused_infer_attention_score`` for generation and evaluation."""

    kernel = staticmethod(attention)
    inference_kernel = staticmethod(infer_attention)
    packed_kernel = staticmethod(packed_attention)
