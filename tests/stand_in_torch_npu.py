"""A stand-in ``torch_npu`` for the NPU contract tests: the fused operators aquila-npu calls, held to the real
torch_npu's own contract and computed with plain PyTorch.

* **The schema, from the real wheel.** ``use_wheel(tests/torch_npu_wheel.load())`` gives it torch_npu 2.13.0's
  operator schemas; every call is bound against the operator's real schema exactly as torch's dispatcher would
  (positional arguments in schema order and no more than the schema has, keyword-only arguments by keyword, every
  keyword a real argument, every required one given, each value of the schema's type); the defaults the
  implementations see are the schema's. A call that would not bind on an NPU raises ``ContractError`` here.
* **The documented conventions, quoted from the wheel.** Each operator asserts the limits its docstring states and
  our calls rely on (layouts, mask dtype, polarity and shapes, cos/sin shapes and size limits, gamma dtype, the
  inference operator's dtypes and head-dim alignment, fully masked rows needing the invalid-row correction);
  ``DOCUMENTED`` holds, per operator, the docstring phrases those asserts come from, and a test checks each phrase is
  in the real wheel's docstring.

It verifies our glue, not torch_npu: real NPU numerics (fused kernels, their rounding) are not reproduced.
"""

from __future__ import annotations

import torch

calls: list[str] = []  # operator names in call order, for tests to see what ran
_schemas: dict = {}


class ContractError(AssertionError):
    """A call torch_npu's schema or documented conventions do not allow."""


def use_wheel(wheel) -> None:
    """Hold every operator to the schemas of this wheel (``tests/torch_npu_wheel.TorchNpuWheel``)."""
    _schemas.clear()
    _schemas.update({name: wheel.schema(name) for name in OPERATORS})


# the docstring phrases (torch_npu 2.13.0, _op_plugin_docs.py) behind the asserts below, per operator
DOCUMENTED = {
    "npu_rms_norm": ["gamma：Tensor类型，数据类型需要和self保持一致", "输入shape支持2-8维"],
    "npu_rotary_mul": ["input: layout支持: BNSD、BSND、SBND; D < 896，且为2的倍数; B, N < 1000",
                       "input为BSND: 1S1D、BS1D、BSND", "input为SBND: S11D、SB1D、SBND",
                       "当需要计算cos/sin的反向梯度时，B*N <= 1024"],
    "npu_swiglu": ["swish(A) * B", "“A”和“B”是x沿dim维度切分的Tensor"],
    "npu_fusion_attention": [
        "支持BSH、SBH、BSND、BNSD、TND", "取值为1(或True)代表该位不参与计算(被遮蔽)", "数据类型支持bool、uint8",
        "输入shape类型支持BNSS格式、B1SS格式、11SS格式、SS格式", "Nq/Nkv必须是非0整数",
        "next_tockens取值为0, pre_tockens大于等于Sq, 表示causal场景sparse, atten_mask应传入下三角矩阵",
        "sparse_mode为1时, 代表allMask, 即传入完整的atten_mask矩阵. 该场景下忽略next_tockens、pre_tockens取值",
        "参数取值与atten_mask分布不一致会导致精度问题", "2为使能无效行计算", "该接口仅在训练场景下使用",
        "keep_prob: 浮点型, 可选参数, 代表Dropout中1的比例",
        # packed documents (layout TND)
        "TND(actual_seq_qlen/actual_seq_kvlen需传值)", "varlen场景只支持SS格式", "表示query每个S的累加和长度",
        "sparse_mode为3时, 代表rightDownCausal模式的mask, 对应以右下顶点划分的下三角场景",
        "atten_mask为优化后的压缩下三角矩阵(2048*2048)", "varlen场景下长度最大支持1K",
        "atten_mask输入不支持补pad，即atten_mask中不能存在某一行全1的场景"],
    "npu_fused_infer_attention_score": [
        "适配增量&全量推理场景的FlashAttention算子", "当Query矩阵的S为1, 进入IncreFlashAttention分支",
        "query: Tensor类型, attention结构的Query输入, 数据类型支持float16、bfloat16、int8, 不支持非连续的Tensor",
        "支持shape传入(1,Q_S,KV_S)、(B,1,Q_S,KV_S)、(1,1,Q_S,KV_S)", "sparse_mode为1时, 代表allMask",
        "需要满足num_heads整除num_key_value_heads", "Q_S为1时该参数仅支持innerPrecise为0和1",
        "inner_precise为2时, 代表开启高精度模式, 且做行无效修正", "输入类型全为float16、bfloat16时, D轴需16对齐",
        "支持BSH、BSND、BNSD、BNSD_BSND、TND", "atten_mask: Tensor类型, 对QK的结果进行mask"],
}


def _conforms(value, kind, element=None) -> bool:
    if kind == "OptionalType":
        return value is None or _conforms(value, element.kind(), getattr(element, "getElementType", lambda: None)())
    if kind == "TensorType":
        return isinstance(value, torch.Tensor)
    if kind in ("IntType", "SymIntType"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FloatType":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BoolType":
        return isinstance(value, bool)
    if kind == "StringType":
        return isinstance(value, str)
    if kind == "ListType":
        return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    raise ContractError(f"the stand-in does not check arguments of type {kind}")


def bind(name: str, args: tuple, kwargs: dict) -> dict:
    """``{argument: value}`` of a call to ``torch_npu.<name>``, bound as the real schema binds it."""
    if name not in _schemas:
        raise ContractError(f"{name}: no schema loaded (call use_wheel first)")
    arguments = list(_schemas[name].arguments)
    positional = [a for a in arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise ContractError(f"{name}() takes {len(positional)} positional arguments, {len(args)} were given")
    bound = {a.name: v for a, v in zip(positional, args)}
    known = {a.name for a in arguments}
    for key, value in kwargs.items():
        if key not in known:
            raise ContractError(f"{name}() has no argument {key!r} (its arguments: {', '.join(sorted(known))})")
        if key in bound:
            raise ContractError(f"{name}() got {key!r} both by position and by keyword")
        bound[key] = value
    for argument in arguments:
        if argument.name not in bound:
            if not argument.has_default_value():
                raise ContractError(f"{name}() misses its required argument {argument.name!r}")
            bound[argument.name] = argument.default_value
            continue
        kind, element = argument.type.kind(), getattr(argument.type, "getElementType", lambda: None)()
        if not _conforms(bound[argument.name], kind, element):
            raise ContractError(f"{name}(): {argument.name} is {argument.type}, not "
                                f"{type(bound[argument.name]).__name__} {bound[argument.name]!r:.60}")
    return bound


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


def operator(fn):
    """The stand-in of ``torch_npu.<fn name>``: the call bound against the real schema, then ``fn(**bound)``."""
    name = fn.__name__

    def call(*args, **kwargs):
        calls.append(name)
        return fn(**bind(name, args, kwargs))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


def _attend(q, k, v, allowed, scale, invalid_rows_corrected):
    """``[b, n, sq, d]`` attention of ``allowed`` ``[b|1, n|1, sq, sk]`` keys, GQA by repetition, softmax in fp32."""
    empty_rows = ~allowed.any(-1)
    _require(invalid_rows_corrected or not bool(empty_rows.any()),
             "a row the mask removes entirely needs inner_precise 2 (the invalid-row correction)")
    groups = k.shape[1]
    _require(q.shape[1] % groups == 0, "query heads must be a whole multiple of key/value heads")
    k, v = (x.repeat_interleave(q.shape[1] // groups, dim=1) for x in (k, v))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v)


def _window_agrees(allowed, s_q, s_k, pre, next_) -> None:
    """sparse_mode 0: what the mask keeps is exactly the pre/next window (causal: next 0, pre >= Sq)."""
    q_pos, k_pos = torch.arange(s_q)[:, None], torch.arange(s_k)[None, :]
    window = (k_pos >= q_pos - pre) & (k_pos <= q_pos + next_)
    _require(bool((allowed == window).all()), f"sparse_mode 0: the mask disagrees with the window pre={pre}, "
                                              f"next={next_} (use sparse_mode 1 for an arbitrary mask)")


def _mask_of(atten_mask, shapes, b, sq, sk):
    _require(atten_mask.dtype in (torch.bool, torch.uint8), "atten_mask must be bool or uint8 (1 / True = masked)")
    _require(tuple(atten_mask.shape) in shapes, f"atten_mask shape {tuple(atten_mask.shape)}: documented are "
                                                f"{', '.join(map(str, shapes))}")
    allowed = ~atten_mask.bool()
    while allowed.dim() < 4:
        allowed = allowed[None]
    return allowed


# ------------------------------------------------------------------------------------------ the operators
@operator
def npu_rms_norm(self, gamma, epsilon):
    """Returns ``(y, rstd)``; ``y = x * rsqrt(mean(x^2, -1) + epsilon) * gamma`` computed in fp32."""
    x = self
    _require(gamma.dtype == x.dtype, f"gamma ({gamma.dtype}) must have the input's dtype ({x.dtype})")
    _require(2 <= x.dim() <= 8, f"npu_rms_norm takes 2-8 dimensions, not {x.dim()}")
    _require(gamma.shape == x.shape[-gamma.dim():], "gamma must match the trailing dimensions of x")
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


@operator
def npu_rotary_mul(self, r1, r2, rotary_mode, rotate):
    """Rotate-half RoPE: ``x * r1 + rotate_half(x) * r2``."""
    x = self
    _require(rotary_mode == "half" and rotate is None, "aquila-npu uses rotary_mode 'half' without rotate")
    _require(x.dim() == 4 and r1.dim() == 4 and r1.shape == r2.shape, "npu_rotary_mul takes 4-D tensors")
    d = x.shape[-1]
    _require(d % 2 == 0 and d < 896, f"D={d}: documented D < 896, even")
    # SBND input: r1 S11D / SB1D / SBND; BSND input: 1S1D / BS1D / BSND
    sbnd = r1.shape[0] == x.shape[0] and r1.shape[1] in (1, x.shape[1])
    bsnd = r1.shape[0] in (1, x.shape[0]) and r1.shape[1] == x.shape[1]
    _require(r1.shape[-1] == d and r1.shape[2] in (1, x.shape[2]) and (sbnd or bsnd),
             f"cos/sin shape {tuple(r1.shape)} for input {tuple(x.shape)}")
    _require(r1.shape[2] == 1 or r1.shape == x.shape, "cos/sin broadcast over heads only with all else equal")
    batch, heads = (x.shape[1] if sbnd else x.shape[0]), x.shape[2]
    _require(batch < 1000 and heads < 1000, f"B={batch}, N={heads}: documented B, N < 1000")
    _require(not (r1.requires_grad or r2.requires_grad) or batch * heads <= 1024, "cos/sin gradients need B*N <= 1024")
    first, second = x.chunk(2, dim=-1)
    return x * r1 + torch.cat((-second, first), dim=-1) * r2


@operator
def npu_swiglu(self, dim):
    """``silu(a) * b`` where ``a, b = x.chunk(2, dim)``."""
    _require(self.shape[dim] % 2 == 0, "npu_swiglu needs an even size along dim")
    a, b = self.chunk(2, dim=dim)
    return torch.nn.functional.silu(a) * b


@operator
def npu_fusion_attention(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
                         pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                         sparse_mode, **_rest):
    """Training FlashAttention: ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``.
    Implemented for what aquila-npu uses: layout SBH with sparse modes 0 (the mask plus the pre/next window) and 1
    (allMask); layout TND (packed documents) with sparse mode 3 (rightDownCausal per document) over the compressed
    2048 x 2048 causal mask; no dropout, no pse."""
    _require(input_layout in ("BSH", "SBH", "BSND", "BNSD", "TND"), f"unknown layout {input_layout!r}")
    _require(input_layout in ("SBH", "TND"), "the stand-in implements SBH and TND only")
    _require(pse is None and padding_mask is None and prefix is None, "aquila-npu passes neither pse, padding_mask "
                                                                      "nor prefix")
    _require(0.0 < keep_prob <= 1.0, "keep_prob is in (0, 1]")
    _require(keep_prob == 1.0, "the stand-in has no dropout")
    _require(atten_mask is not None, "aquila-npu always passes the mask its window describes")
    if input_layout == "TND":
        return _varlen_attention(query, key, value, head_num, atten_mask, scale, actual_seq_qlen, actual_seq_kvlen,
                                 sparse_mode)
    _require(actual_seq_qlen is None and actual_seq_kvlen is None, "actual_seq_qlen/kvlen are for layout TND")
    _require(sparse_mode in (0, 1), f"sparse_mode {sparse_mode}: the stand-in implements 0 and 1 for SBH")
    s_q, b, hidden = query.shape
    s_k = key.shape[0]
    _require(hidden % head_num == 0 and key.shape == value.shape, "query [S, B, N*D]; key and value alike")
    d = hidden // head_num
    groups = key.shape[-1] // d
    _require(groups * d == key.shape[-1] and head_num % groups == 0, "Nq/Nkv must be a whole number")
    allowed = _mask_of(atten_mask, [(b, head_num, s_q, s_k), (b, 1, s_q, s_k), (1, 1, s_q, s_k), (s_q, s_k)],
                       b, s_q, s_k)
    if sparse_mode == 0:  # the mask must agree with the window ("a mismatch causes precision problems")
        _window_agrees(allowed, s_q, s_k, pre_tockens, next_tockens)
    q = query.reshape(s_q, b, head_num, d).permute(1, 2, 0, 3)
    k = key.reshape(s_k, b, groups, d).permute(1, 2, 0, 3)
    v = value.reshape(s_k, b, groups, d).permute(1, 2, 0, 3)
    out = _attend(q, k, v, allowed, scale, inner_precise in (2, 3))
    empty = torch.empty(0)
    return out.permute(2, 0, 1, 3).reshape(s_q, b, hidden), empty, empty, empty, 0, 0, 0


def _varlen_attention(query, key, value, head_num, atten_mask, scale, ends_q, ends_kv, sparse_mode):
    """Layout TND: query ``[T, N, D]``, key/value ``[T, N_kv, D]``, documents by cumulative lengths; sparse mode 3
    with the compressed causal mask (varlen takes the mask as SS only)."""
    _require(ends_q is not None and ends_kv is not None, "TND needs actual_seq_qlen and actual_seq_kvlen")
    _require(len(ends_q) == len(ends_kv) and 1 <= len(ends_q) <= 1024, "varlen: 1 to 1K documents, as many for kv")
    _require(list(ends_q) == sorted(ends_q) and list(ends_kv) == sorted(ends_kv), "cumulative lengths")
    _require(sparse_mode == 3, f"sparse_mode {sparse_mode}: the stand-in implements 3 (rightDownCausal) for TND")
    _require(atten_mask.dtype in (torch.bool, torch.uint8) and tuple(atten_mask.shape) == (2048, 2048),
             f"sparse_mode 3 takes the compressed 2048 x 2048 mask, not {tuple(atten_mask.shape)}")
    _require(bool((atten_mask.bool() == torch.ones(2048, 2048, dtype=torch.bool).triu(1)).all()),
             "the compressed mask is the causal one: True (masked) above the diagonal")
    t_q, n_q, d = query.shape
    _require(query.dim() == key.dim() == 3 and key.shape == value.shape and key.shape[2] == d,
             "query [T, N, D]; key and value [T, N_kv, D]")
    _require(n_q == head_num and head_num % key.shape[1] == 0, "head_num is the query's N, a multiple of N_kv")
    _require(ends_q[-1] == t_q and ends_kv[-1] == key.shape[0], "the last cumulative length is T")
    out = torch.zeros_like(query)
    starts_q, starts_kv = [0, *ends_q[:-1]], [0, *ends_kv[:-1]]
    for sq0, sq1, sk0, sk1 in zip(starts_q, ends_q, starts_kv, ends_kv):
        if sq1 == sq0:
            continue
        lq, lk = sq1 - sq0, sk1 - sk0
        allowed = ~torch.ones(lq, lk, dtype=torch.bool).triu(1 + lk - lq)  # bottom-right causal
        _require(bool(allowed.any(-1).all()), "varlen masks may not remove a whole row")
        q = query[sq0:sq1].permute(1, 0, 2)[None]
        k, v = (x[sk0:sk1].permute(1, 0, 2)[None] for x in (key, value))
        out[sq0:sq1] = _attend(q, k, v, allowed[None, None], scale, False)[0].permute(1, 0, 2)
    empty = torch.empty(0)
    return out, empty, empty, empty, 0, 0, 0


@operator
def npu_fused_infer_attention_score(query, key, value, atten_mask, num_heads, scale, pre_tokens, next_tokens,
                                    input_layout, num_key_value_heads, sparse_mode, inner_precise, block_table,
                                    actual_seq_lengths, actual_seq_lengths_kv, pse_shift, **_rest):
    """Inference FlashAttention (prefill, and Q_S = 1 decode against a KV cache): ``(attention_out, softmax_lse)``.
    Implemented for what aquila-npu uses: layout BSND, a boolean mask, sparse modes 0 and 1."""
    _require(input_layout in ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND"), f"unknown layout {input_layout!r}")
    _require(input_layout == "BSND", "the stand-in implements BSND only")
    _require(query.dtype in (torch.float16, torch.bfloat16), f"query dtype {query.dtype}: float16 / bfloat16 (int8)")
    _require(all(x.is_contiguous() for x in (query, key, value)), "query, key and value must be contiguous")
    _require(block_table is None and pse_shift is None, "aquila-npu uses neither page attention nor pse_shift")
    b, s_q, n_q, d = query.shape
    s_k, n_kv = key.shape[1], key.shape[2]
    _require(key.shape == value.shape and key.shape[0] == b and key.shape[3] == d, "key and value [B, S, N_kv, D]")
    _require(n_q == num_heads, f"num_heads {num_heads} is not the query's N ({n_q})")
    _require(n_kv == (num_key_value_heads or num_heads), f"num_key_value_heads {num_key_value_heads} is not the "
                                                          f"key's N ({n_kv})")
    _require(num_heads % n_kv == 0 and num_heads // n_kv <= 64, "num_heads must be a multiple (<= 64x) of the kv heads")
    _require(d % 16 == 0, f"D={d}: float16 / bfloat16 need D aligned to 16")
    _require(sparse_mode in (0, 1), f"sparse_mode {sparse_mode}: the stand-in implements 0 and 1")
    _require(actual_seq_lengths is None and actual_seq_lengths_kv is None, "aquila-npu passes its masks instead")
    if s_q == 1:
        _require(inner_precise in (0, 1), "Q_S = 1 supports inner_precise 0 and 1 only")
    if atten_mask is None:
        allowed = torch.ones(1, 1, s_q, s_k, dtype=torch.bool)
    else:
        _require(atten_mask.is_contiguous(), "atten_mask must be contiguous")
        allowed = _mask_of(atten_mask, [(1, s_q, s_k), (b, 1, s_q, s_k), (1, 1, s_q, s_k)]
                           + ([(b, s_k)] if s_q == 1 else [(s_q, s_k)]), b, s_q, s_k)
        if s_q > 1 and sparse_mode == 0:
            _window_agrees(allowed, s_q, s_k, pre_tokens, next_tokens)
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    out = _attend(q, k, v, allowed, scale, inner_precise in (2, 3))
    return out.permute(0, 2, 1, 3).contiguous(), torch.zeros(1)


OPERATORS = ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention", "npu_fused_infer_attention_score")


# ------------------------------------------------------------------------------------------ the runtime
runtime_calls: list[str] = []


class _Mstx:
    """``torch_npu.npu.mstx``: msprof's marks and ranges (recorded)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._next = 0

    def mark(self, message, stream=None, domain="default"):
        self.events.append(("mark", message))

    def range_start(self, message, stream=None, domain="default") -> int:
        self._next += 1
        self.events.append(("range_start", message, self._next))
        return self._next

    def range_end(self, range_id, domain="default"):
        self.events.append(("range_end", range_id))


def cpu_as_npu():
    """``torch.npu`` for tests that run the stand-in operators in a process with a CPU-only torch: tensors stay on
    the CPU, so the "NPU's" generator is the CPU's."""
    import types

    return types.SimpleNamespace(get_rng_state=lambda device="npu": torch.get_rng_state(),
                                 set_rng_state=lambda state, device="npu": torch.set_rng_state(state), mstx=_Mstx())


def install_runtime(device_count: int) -> None:
    """Stand in for what ``import torch_npu`` does to torch in a process (call it in a fresh one: the backend rename
    cannot be undone): ``torch.npu`` (device count and selection, one RNG generator per NPU, ``mstx``), the ``npu``
    device type, and the ``torch_npu.contrib.transfer_to_npu`` bridge — its import is recorded, and it maps
    ``torch.cuda``'s device and RNG functions onto ``torch.npu`` as the real one does; like the real one, it leaves
    ``torch.cuda._lazy_call``, ``torch.cuda.nvtx`` and ``torch.compile`` alone."""
    import sys
    import types

    current = [0]
    generators = tuple(torch.Generator() for _ in range(device_count))

    def set_device(index):
        runtime_calls.append(f"set_device({index})")
        if not 0 <= index < device_count:
            raise RuntimeError(f"NPU {index} does not exist ({device_count} NPUs)")
        current[0] = index

    def _index(device):
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return current[0] if device.index is None else device.index

    module = sys.modules[__name__]
    torch.utils.rename_privateuse1_backend("npu")
    torch.npu = module.npu = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: device_count, set_device=set_device,
        current_device=lambda: current[0], default_generators=generators,
        manual_seed=lambda seed: generators[current[0]].manual_seed(seed),
        get_rng_state=lambda device="npu": generators[_index(device)].get_state(),
        set_rng_state=lambda state, device="npu": generators[_index(device)].set_state(state),
        mstx=_Mstx())
    sys.modules["torch_npu"] = module
    sys.modules["torch_npu.npu"] = torch.npu
    contrib = types.ModuleType("torch_npu.contrib")
    bridge = types.ModuleType("torch_npu.contrib.transfer_to_npu")

    def import_bridge(name):  # its import is what maps torch.cuda onto the NPU: record it, map what it maps
        if name != "transfer_to_npu":
            raise AttributeError(name)
        if not hasattr(contrib, "_imported"):
            contrib._imported = True
            runtime_calls.append("import transfer_to_npu")
            for name_ in ("is_available", "device_count", "set_device", "current_device", "manual_seed",
                          "get_rng_state", "set_rng_state", "default_generators"):
                setattr(torch.cuda, name_, getattr(torch.npu, name_))
        return bridge

    contrib.__getattr__ = import_bridge
    sys.modules["torch_npu.contrib"] = contrib
