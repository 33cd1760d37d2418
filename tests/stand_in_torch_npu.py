"""A stand-in ``torch_npu`` for the NPU contract tests: the four fused operators aquila-npu calls, with the
signatures and conventions torch_npu documents, computed with plain PyTorch — and asserting those conventions, so a
call that would be wrong on an NPU (layout, mask polarity or shape, head counts, result indexing) fails here.

It verifies our glue, not torch_npu: real NPU numerics (fused kernels, their rounding) are not reproduced.
"""

from __future__ import annotations

import torch

LAYOUTS = ("SBH", "BSH", "BNSD", "BSND")
calls: list[str] = []  # operator names in call order, for tests to see what ran


def npu_rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """Returns ``(y, rstd)``; ``y = x * rsqrt(mean(x^2, -1) + epsilon) * gamma`` computed in fp32."""
    calls.append("npu_rms_norm")
    assert gamma.shape == x.shape[-gamma.dim():], "gamma must match the trailing dimensions of x"
    assert isinstance(epsilon, float)
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def npu_rotary_mul(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor):
    """Rotate-half RoPE: ``x * r1 + rotate_half(x) * r2``; 4-D ``x``, ``r1``/``r2`` of one shape broadcasting to it."""
    calls.append("npu_rotary_mul")
    assert x.dim() == 4 and r1.dim() == 4 and r1.shape == r2.shape, "npu_rotary_mul takes 4-D tensors"
    assert r1.shape[-1] == x.shape[-1], "cos/sin must cover the whole head dimension"
    # the documented cos/sin shapes for x [S, B, N, D] (and [B, S, N, D]): S11D, SB1D, SBND (1S1D, BS1D, BSND)
    assert r1.shape[2] in (1, x.shape[2]) and r1.shape[0] in (1, x.shape[0]) and r1.shape[1] in (1, x.shape[1])
    assert r1.shape[2] == 1 or r1.shape == x.shape, "cos/sin broadcast over heads only with all else equal"
    first, second = x.chunk(2, dim=-1)
    return x * r1 + torch.cat((-second, first), dim=-1) * r2


def npu_swiglu(x: torch.Tensor, dim: int = -1):
    """``silu(a) * b`` where ``a, b = x.chunk(2, dim)``."""
    calls.append("npu_swiglu")
    assert x.shape[dim] % 2 == 0, "npu_swiglu needs an even size along dim"
    a, b = x.chunk(2, dim=dim)
    return torch.nn.functional.silu(a) * b


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    """FlashAttention: returns ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``.
    ``atten_mask``: bool, True = masked out, ``[s_q, s_k]`` or ``[b, 1, s_q, s_k]``; GQA when key/value carry fewer
    heads than ``head_num``. Only what aquila-npu uses is implemented: layout ``SBH``, no dropout, no pse."""
    calls.append("npu_fusion_attention")
    assert input_layout in LAYOUTS, f"unknown layout {input_layout!r}"
    assert input_layout == "SBH", "the stand-in implements SBH only"
    assert isinstance(head_num, int) and query.dim() == 3 and query.shape[-1] % head_num == 0
    assert pse is None and padding_mask is None, "aquila-npu passes neither pse nor padding_mask"
    assert 0.0 < keep_prob <= 1.0 and keep_prob == 1.0, "the stand-in has no dropout"
    assert atten_mask is not None and atten_mask.dtype == torch.bool, "atten_mask must be boolean (True = masked)"
    s_q, b, _ = query.shape
    s_k = key.shape[0]
    assert atten_mask.shape in ((s_q, s_k), (b, 1, s_q, s_k)), f"atten_mask shape {tuple(atten_mask.shape)}"
    d = query.shape[-1] // head_num
    assert key.shape[-1] % d == 0 and key.shape == value.shape
    groups = key.shape[-1] // d
    assert head_num % groups == 0, "query heads must be a multiple of key/value heads"
    q = query.reshape(s_q, b, head_num, d).permute(1, 2, 0, 3)
    k = key.reshape(s_k, b, groups, d).permute(1, 2, 0, 3).repeat_interleave(head_num // groups, dim=1)
    v = value.reshape(s_k, b, groups, d).permute(1, 2, 0, 3).repeat_interleave(head_num // groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    allowed = ~(atten_mask if atten_mask.dim() == 4 else atten_mask[None, None])
    positions_q = torch.arange(s_q)[:, None]
    positions_k = torch.arange(s_k)[None, :]
    # the sparse window: pre_tockens earlier keys, next_tockens later keys (next_tockens=0: causal)
    allowed = allowed & (positions_k >= positions_q - pre_tockens) & (positions_k <= positions_q + next_tockens)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs.to(value.dtype), v).permute(2, 0, 1, 3).reshape(s_q, b, head_num * d)
    empty = torch.empty(0)
    return out, empty, empty, empty, 0, 0, 0


# ------------------------------------------------------------------------------------------ the runtime
runtime_calls: list[str] = []


def install_runtime(device_count: int) -> None:
    """Stand in for what ``import torch_npu`` does to torch in a process (call it in a fresh one: the backend rename
    cannot be undone): ``torch.npu`` with ``is_available``, ``device_count``, ``set_device``, ``current_device``;
    the ``npu`` device type; and the ``torch_npu.contrib.transfer_to_npu`` bridge, whose import is recorded."""
    import sys
    import types

    current = [0]

    def set_device(index):
        runtime_calls.append(f"set_device({index})")
        assert 0 <= index < device_count, f"NPU {index} does not exist ({device_count} NPUs)"
        current[0] = index

    torch.utils.rename_privateuse1_backend("npu")
    torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: device_count,
                                      set_device=set_device, current_device=lambda: current[0])
    sys.modules["torch_npu"] = sys.modules[__name__]
    contrib = types.ModuleType("torch_npu.contrib")
    bridge = types.ModuleType("torch_npu.contrib.transfer_to_npu")

    def import_bridge(name):  # its import is what maps torch.cuda onto the NPU: record it
        if name != "transfer_to_npu":
            raise AttributeError(name)
        runtime_calls.append("import transfer_to_npu")
        contrib.transfer_to_npu = bridge
        return bridge

    contrib.__getattr__ = import_bridge
    sys.modules["torch_npu.contrib"] = contrib
