"""NPU kernel contract tests (no NPU here). ``aquila_npu.kernels.npu`` calls torch_npu's fused operators; a stand-in
``torch_npu`` (tests/stand_in_torch_npu.py) binds every call against the **real torch_npu 2.13.0 operator schemas**,
read from its wheel (tests/torch_npu_wheel.py: fetched from the package registry, never installed), asserts the
conventions the wheel's docstrings state, and computes with reference math. Each NPU kernel must then equal the
plain-PyTorch reference, forward and backward, in fp32 and bf16, over GQA and odd shapes. This verifies our glue;
it says nothing of real NPU numerics or speed. Without the wheel (no registry) these tests skip, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import stand_in_torch_npu
import torch
import torch_npu_wheel
from kernel_checks import (
    attention_inputs,
    rotary_tables,
    same_forward_backward,
    same_model_outputs,
)
from kernel_checks import rotary_angles as kernel_checks_angles
from stand_in_torch_npu import ContractError


@pytest.fixture(scope="module")
def wheel():
    found, why = torch_npu_wheel.load()
    if found is None:
        pytest.skip(why)
    return found


@pytest.fixture(autouse=True)
def torch_npu(request, monkeypatch):
    if "no_wheel" not in request.keywords:
        stand_in_torch_npu.use_wheel(request.getfixturevalue("wheel"))
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", stand_in_torch_npu)
    # in this process the stand-in's "NPU" computes on the CPU: its generator is the CPU's
    monkeypatch.setattr(torch, "npu", stand_in_torch_npu.cpu_as_npu(), raising=False)
    stand_in_torch_npu.calls.clear()
    return stand_in_torch_npu


def _check(npu_fn, ref_fn, inputs, dtype, op):
    """The NPU kernel equals the reference forward and backward, and called torch_npu's ``op``."""
    same_forward_backward(npu_fn, ref_fn, inputs, dtype)
    assert stand_in_torch_npu.calls[-1] == op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 45), (2, 128)])
def test_rms_norm(dtype, shape):
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(0)
    x, w = torch.randn(*shape), 1 + 0.1 * torch.randn(shape[-1])
    _check(lambda x, w: npu.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5), [x, w], dtype,
           "npu_rms_norm")


def test_rms_norm_gives_gamma_the_inputs_dtype():
    """npu_rms_norm needs gamma in x's dtype: a bf16 activation with an fp32 weight (or the reverse) is computed in
    the wider dtype, as the reference's type promotion does."""
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(12)
    x, w = torch.randn(5, 2, 64, dtype=torch.bfloat16), 1 + 0.1 * torch.randn(64)
    for a, b in ((x, w), (x.float(), w.bfloat16())):
        out = npu.rms_norm(a, b, 1e-5)
        expected = reference.rms_norm(a, b, 1e-5)
        assert out.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
def test_apply_rotary(dtype, layout):
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(1)
    s, b, n, d = 7, 3, 5, 16
    cos, sin = rotary_tables(s, d, layout)
    t = torch.randn(*((s, b, n, d) if layout == "sbhd" else (b, s, n, d)))
    _check(lambda t, c, s_: npu.apply_rotary(t, c, s_), lambda t, c, s_: reference.apply_rotary(t, c, s_),
           [t, cos, sin], dtype, "npu_rotary_mul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention(dtype, heads, groups, padded):
    from aquila_npu.kernels import npu, reference

    d = 16
    q, k, v, mask = attention_inputs(9, 3, heads, groups, d, padded, seed=2)
    scale = d ** -0.5
    _check(lambda q, k, v: npu.attention(q, k, v, scale, mask), lambda q, k, v: reference.attention(q, k, v, scale, mask),
           [q, k, v], dtype, "npu_fusion_attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4)])
def test_packed_attention(dtype, heads, groups):
    """Packed documents (THD): npu_fusion_attention in layout TND with cumulative lengths, sparse mode 3 and the
    compressed causal mask, equal to the reference's block-diagonal attention forward and backward."""
    from aquila_npu.kernels import npu, reference

    generator = torch.Generator().manual_seed(5)
    lengths = [4, 1, 7, 3]
    q = torch.randn(sum(lengths), heads, 16, generator=generator)
    k, v = (torch.randn(sum(lengths), groups, 16, generator=generator) for _ in range(2))
    cu = torch.tensor([0, 4, 5, 12, 15], dtype=torch.int32)
    _check(lambda q, k, v: npu.packed_attention(q, k, v, 0.25, cu, cu),
           lambda q, k, v: reference.packed_attention(q, k, v, 0.25, cu, cu), [q, k, v], dtype, "npu_fusion_attention")


def test_the_packed_rotary_slot_equals_megatron_cores_thd_rope():
    """megatron-core's fused-RoPE slot for THD filled with npu_rotary_mul: positions restart at each document, as
    in megatron-core's own unfused _apply_rotary_pos_emb_thd."""
    from aquila_npu.kernels.seams import megatron_rotary_thd_slot
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_thd,
    )

    from aquila_npu.kernels import npu

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    cu = torch.tensor([0, 4, 5, 12], dtype=torch.int32)
    freqs = kernel_checks_angles(7, 16)[:, None, None, :]
    slot = megatron_rotary_thd_slot(npu.apply_rotary)
    same_forward_backward(lambda t: slot(t, cu, freqs), lambda t: _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=OneRank()),
                          [torch.randn(12, 3, 16)], torch.float32)
    assert stand_in_torch_npu.calls[-1] == "npu_rotary_mul"


@pytest.mark.no_wheel
def test_attention_reference_is_causal_softmax_attention():
    """The reference itself against torch's scaled_dot_product_attention (MHA, causal)."""
    from aquila_npu.kernels import reference

    torch.manual_seed(3)
    q, k, v = (torch.randn(5, 2, 4, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(x.permute(1, 2, 0, 3) for x in (q, k, v)), is_causal=True).permute(2, 0, 1, 3)
    torch.testing.assert_close(reference.attention(q, k, v, 8 ** -0.5), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(4)
    _check(npu.swiglu, reference.swiglu, [torch.randn(7, 3, 2 * 24)], dtype, "npu_swiglu")


# ------------------------------------------------------------------ the contract is the real wheel's
def test_every_operator_we_call_is_in_the_wheel_and_its_documented_limits_are_quoted_right(wheel):
    """The operators exist in torch_npu 2.13.0 under these names, and every docstring phrase the stand-in's asserts
    rest on is in the wheel's own docstring of that operator."""
    for name, phrases in stand_in_torch_npu.DOCUMENTED.items():
        schema = wheel.schema(name)
        assert schema.name == f"npu::{name}"
        missing = [p for p in phrases if p not in wheel.docstrings[name]]
        assert not missing, f"{name}: not in torch_npu's docstring: {missing}"
    attention = {a.name: a for a in wheel.schema("npu_fusion_attention").arguments}
    assert attention["pre_tockens"].default_value == attention["next_tockens"].default_value == 2147483647


def _q(s=4, b=1, hidden=32):
    return torch.randn(s, b, hidden)


def test_a_wrong_keyword_order_or_value_is_refused():
    """What the schema does not have fails here as it would on the device: a keyword torch_npu spells differently
    in this operator (pre_tokens is the inference operator's spelling), arguments out of schema order, a
    keyword-only argument given by position, a value of the wrong type, and a layout or mask the docstring does
    not allow."""
    q, mask = _q(), torch.ones(4, 4, dtype=torch.bool).triu(1)
    fa = stand_in_torch_npu.npu_fusion_attention
    fa(q, q, q, 2, "SBH", atten_mask=mask, scale=1.0, next_tockens=0)  # the right call binds
    with pytest.raises(ContractError, match="no argument 'pre_tokens'"):
        fa(q, q, q, 2, "SBH", atten_mask=mask, pre_tokens=4, next_tockens=0)
    with pytest.raises(ContractError, match="head_num is int"):
        fa(q, q, q, "SBH", 2, atten_mask=mask)
    with pytest.raises(ContractError, match="scale is float"):
        fa(q, q, q, 2, "SBH", atten_mask=mask, scale="0.5")
    with pytest.raises(ContractError, match="unknown layout"):
        fa(q, q, q, 2, "SHB", atten_mask=mask, next_tockens=0)
    with pytest.raises(ContractError, match="bool or uint8"):
        fa(q, q, q, 2, "SBH", atten_mask=mask.float(), next_tockens=0)
    with pytest.raises(ContractError, match="disagrees with the window"):
        fa(q, q, q, 2, "SBH", atten_mask=mask, pre_tockens=65536)  # causal mask, no causal window (sparse_mode 0)
    b = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ContractError, match="takes 3 positional arguments"):
        stand_in_torch_npu.npu_fused_infer_attention_score(b, b, b, None, num_heads=2, input_layout="BSND")
    with pytest.raises(ContractError, match="no argument 'head_num'"):
        stand_in_torch_npu.npu_fused_infer_attention_score(b, b, b, head_num=2, input_layout="BSND")
    with pytest.raises(ContractError, match="even"):
        stand_in_torch_npu.npu_swiglu(torch.randn(3, 5))
    with pytest.raises(ContractError, match="gamma"):
        stand_in_torch_npu.npu_rms_norm(torch.randn(3, 8), torch.ones(8, dtype=torch.bfloat16))


class _Misspelling:
    """torch_npu as our kernel module sees it, with one keyword of one operator renamed on the way."""

    def __init__(self, operator: str, ours: str, wrong: str) -> None:
        self.operator, self.ours, self.wrong = operator, ours, wrong

    def __getattr__(self, name):
        real = getattr(stand_in_torch_npu, name)
        if name != self.operator:
            return real

        def call(*args, **kwargs):
            if self.ours in kwargs:
                kwargs[self.wrong] = kwargs.pop(self.ours)
            return real(*args, **kwargs)

        return call


@pytest.mark.parametrize("operator, ours, wrong", [("npu_fusion_attention", "next_tockens", "next_tokens"),
                                                   ("npu_fused_infer_attention_score", "num_heads", "head_num"),
                                                   ("npu_rms_norm", "epsilon", "eps")])
def test_our_kernels_fail_the_contract_when_a_keyword_is_misspelt(monkeypatch, operator, ours, wrong):
    """The kernel checks below are not vacuous: our own calls with one keyword misspelt fail them."""
    from aquila_npu.kernels import npu

    monkeypatch.setattr(npu, "_torch_npu", lambda: _Misspelling(operator, ours, wrong))
    q, k, v, _ = attention_inputs(4, 1, 4, 2, 16, padded=False, seed=0)
    with pytest.raises(ContractError, match=f"no argument '{wrong}'"):
        if operator == "npu_rms_norm":
            npu.rms_norm(torch.randn(3, 16), torch.ones(16), 1e-5)
        elif operator == "npu_fusion_attention":
            npu.attention(q, k, v, 0.25)
        else:
            npu.infer_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25)


# ------------------------------------------------------------------ attention semantics as documented
def test_training_attention_is_causal_the_documented_way():
    """Causal training attention: next_tockens 0, pre_tockens left at its default (>= Sq), the lower-triangular
    mask, sparse mode 0 — the stand-in checks the mask agrees with that window."""
    from aquila_npu.kernels import npu, reference

    q, k, v, _ = attention_inputs(9, 2, 6, 2, 16, padded=False, seed=7)
    torch.testing.assert_close(npu.attention(q, k, v, 0.25), reference.attention(q, k, v, 0.25))


def test_a_mask_with_fully_masked_rows_goes_as_allmask_with_the_invalid_row_correction():
    """An arbitrary mask (here rows 0-2 of batch row 1 attend to nothing) is sent whole (sparse_mode 1) with
    inner_precise 2, as documented for rows the mask removes entirely; those rows give zeros, as the reference."""
    from aquila_npu.kernels import npu, reference

    q, k, v, _ = attention_inputs(6, 2, 4, 2, 16, padded=False, seed=8)
    mask = reference.causal_mask(6, 6)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :3] = True
    torch.testing.assert_close(npu.attention(q, k, v, 0.25, mask), reference.attention(q, k, v, 0.25, mask))
    with pytest.raises(ContractError, match="inner_precise 2"):  # what the correction is for
        stand_in_torch_npu.npu_fusion_attention(q.reshape(6, 2, -1), k.reshape(6, 2, -1), v.reshape(6, 2, -1), 4,
                                                "SBH", atten_mask=mask, sparse_mode=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, groups", [(8, 2), (4, 4)])
def test_inference_prefill_of_a_left_padded_batch_equals_the_reference(dtype, heads, groups):
    """Prefill of a left-padded batch (the generation batch's own mask) through npu_fused_infer_attention_score."""
    from aquila_npu.kernels import npu, reference

    q, k, v, mask = attention_inputs(9, 3, heads, groups, 16, padded=True, seed=9)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    torch.testing.assert_close(npu.infer_attention(q, k, v, 0.25, mask), reference.attention(q, k, v, 0.25, mask),
                               atol=1e-2, rtol=1e-2)
    assert stand_in_torch_npu.calls == ["npu_fused_infer_attention_score"]


def test_a_decode_step_against_the_kv_cache_uses_the_inference_operator():
    """One query per row at the end of 7 cached keys, rows left-padded by 0, 2 and 4 ([b, 1, 1, sk] mask, as
    megatron-core slices the batch's mask at a decode step): through the attention module in inference (eval, no
    autograd) it is npu_fused_infer_attention_score that runs, not the training operator."""
    from aquila_npu.generate.batching import padding_mask
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(10)
    q = torch.randn(1, 3, 8, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(7, 3, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    mask = padding_mask([0, 2, 4], 7, "cpu")[:, :, -1:, :]
    module = npu.NpuFlashAttention.__new__(npu.NpuFlashAttention)
    torch.nn.Module.__init__(module)
    module.scale = 0.25
    module.eval()
    with torch.no_grad():
        out = module(q, k, v, mask)
    assert stand_in_torch_npu.calls == ["npu_fused_infer_attention_score"]
    torch.testing.assert_close(out, reference.attention(q, k, v, 0.25, mask).reshape(1, 3, -1), atol=1e-2, rtol=1e-2)
    module.train()
    module(q.float(), k.float(), v.float(), mask)  # training: the training operator
    assert stand_in_torch_npu.calls[-1] == "npu_fusion_attention"


def test_fp32_inference_computes_with_the_reference():
    """npu_fused_infer_attention_score takes float16 / bfloat16 only: fp32 inference never calls it."""
    from aquila_npu.kernels import npu, reference

    q, k, v, mask = attention_inputs(5, 2, 4, 2, 16, padded=True, seed=11)
    torch.testing.assert_close(npu.infer_attention(q, k, v, 0.25, mask), reference.attention(q, k, v, 0.25, mask))
    assert stand_in_torch_npu.calls == []


def test_doctor_check_runs_every_npu_kernel_at_7b_shapes_through_the_contract():
    """``doctor --check``'s kernel rows on the npu kernel set (here through the schema-bound stand-in): every op
    and the inference operator, 7B and 34B-GQA shapes, fp32 and bf16 — all within tolerance."""
    from aquila_npu import doctor_check, plugin_manager

    rows = doctor_check.kernel_rows("npu", plugin_manager.get(), "cpu")
    assert {r.check.split(":")[0] for r in rows} == {"rms_norm", "attention", "attention (inference)", "rotary",
                                                      "swiglu"}
    assert len(rows) == 2 * (1 + 2 + 2 + 1 + 1) and all(r.result == "ok" for r in rows), [vars(r) for r in rows]
    assert {"npu_rms_norm", "npu_fusion_attention", "npu_fused_infer_attention_score", "npu_rotary_mul",
            "npu_swiglu"} <= set(stand_in_torch_npu.calls)


@pytest.fixture(scope="module")
def hf_tiny(tiny_spec, tmp_path_factory):
    """Made before the stand-in torch_npu is in sys.modules (transformers looks for torch_npu when it loads)."""
    from conftest import make_hf_checkpoint

    return make_hf_checkpoint(tiny_spec, tmp_path_factory.mktemp("npu-gen") / "hf", seed=5)


@pytest.mark.slow
def test_greedy_generation_through_the_npu_kernels_equals_the_reference_kernels(megatron_world, hf_tiny,
                                                                                 tokenizer_dir, monkeypatch):
    """A tiny Aquila2 in bf16 generates the same greedy tokens (mixed-length prompts, so a left-padded batch, then
    decode steps against the KV cache) with the npu kernel set as with the reference kernels; prefill and decode
    went through the inference operator, never the training one."""
    from aquila_npu import plugin_manager
    from aquila_npu.generate import GenerateOptions, SamplingOptions, TextGenerator

    hf = hf_tiny
    prompts = ["Aquila2 is", "悟道·天鹰（Aquila2）是北京智源人工智能研究院发布的", "Megatron splits each layer"]
    plugins = plugin_manager.get()

    def completions(kernel_set):
        monkeypatch.setattr(plugin_manager, "active_kernels", lambda: kernel_set)
        generator = TextGenerator(GenerateOptions(load=str(hf), tokenizer_name_or_path=str(tokenizer_dir),
                                                  load_model_type="hf", model="aquila2-tiny", params_dtype="bf16",
                                                  max_batch_size=3))
        results = generator.generate(prompts, SamplingOptions(max_new_tokens=8, greedy=True))
        return [r.tokens for r in results]

    expected = completions(plugins.kernels("cpu"))
    registry = plugins.patch_registry("npu")
    registry.apply()
    try:
        stand_in_torch_npu.calls.clear()
        got = completions(plugins.kernels("npu"))
    finally:
        registry.revert()
    assert got == expected and all(expected)
    assert "npu_fused_infer_attention_score" in stand_in_torch_npu.calls
    assert "npu_fusion_attention" not in stand_in_torch_npu.calls


def test_aquila2_tiny_through_the_npu_plugin_matches_the_reference(megatron_world, tiny_spec):
    """The npu plugin's kernels in a whole aquila2-tiny (GQA), all four on by default (npu_rotary_mul through the
    plugin's patch of megatron-core's fused-RoPE slot): logits and every weight gradient equal those of the reference
    kernels for the same weights (on this CPU, with the stand-in torch_npu)."""
    from aquila_npu.kernels.seams import OPS

    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    npu_set = plugins.kernels("npu")
    assert npu_set.fused == set(OPS) and npu_set.config_overrides()["apply_rope_fusion"] is True
    registry = plugins.patch_registry("npu")
    registry.apply()
    try:
        same_model_outputs(tiny_spec, npu_set, plugins.kernels("cpu"))
    finally:
        registry.revert()
    assert set(stand_in_torch_npu.calls) == {"npu_rms_norm", "npu_fusion_attention", "npu_swiglu", "npu_rotary_mul"}


def test_the_npu_kernel_set_on_packed_documents_matches_the_reference(megatron_world, tiny_spec):
    """Packed training (THD): the whole NPU set, its rotary in megatron-core's packed fused-RoPE slot and its
    attention as npu_fusion_attention TND, gives the reference's logits and weight gradients over one sequence of
    four documents."""
    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    registry = plugins.patch_registry("npu")
    registry.apply()
    try:
        same_model_outputs(tiny_spec, plugins.kernels("npu"), plugins.kernels("cpu"), packed=[5, 1, 9, 3])
    finally:
        registry.revert()
    assert {"npu_fusion_attention", "npu_rotary_mul"} <= set(stand_in_torch_npu.calls)


def test_the_npu_flags_turn_each_fused_kernel_off(megatron_world, tiny_spec):
    """--no-use-fused-rotary-pos-emb and --no-use-flash-attn: megatron-core's RoPE and attention run, the other two
    fused kernels still do."""
    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    kernels = plugins.kernels("npu", {"rotary": False, "attention": False})
    assert kernels.fused == {"rms_norm", "swiglu"}
    same_model_outputs(tiny_spec, kernels, plugins.kernels("cpu"))
    assert set(stand_in_torch_npu.calls) == {"npu_rms_norm", "npu_swiglu"}


@pytest.mark.no_wheel
def test_device_initialisation_contract(tmp_path):
    """HCCL and the transfer_to_npu bridge, against a stand-in torch_npu runtime (in a fresh process, since it
    renames torch's PrivateUse1 backend to "npu" as torch_npu does): the npu plugin imports the bridge before
    anything else touches CUDA names, binds local rank 9 of 8 NPUs to NPU 1, and trains over hccl — the Megatron-LM
    route keeps Megatron's nccl, which the bridge maps to hccl. The NPU options become the runtime's environment
    variables (NPU_ASD_ENABLE, HCCL_CONNECT_TIMEOUT) and never reach Megatron-LM's parser."""
    from conftest import run_python

    script = tmp_path / "contract.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import stand_in_torch_npu
stand_in_torch_npu.install_runtime(device_count=8)
from aquila_npu import plugin_manager
plugins = plugin_manager.get()
assert plugins.select_device() == "npu", "the npu device is preferred when torch_npu finds an NPU"
device = plugins.hook.aquila_npu_initialize_device(device="npu", local_rank=9)
print(device, stand_in_torch_npu.runtime_calls, plugins.backend("npu"),
      plugins.megatron_defaults("npu")["--distributed-backend"])
from aquila_npu.megatron_lm import arguments as megatron_lm
argv, ours, _ = megatron_lm.expand_argv(["--plugin", "aquila2", "--npu-asd-enable", "2",
                                         "--hccl-connect-timeout=1200", "--seq-length", "64"], plugins)
print(sorted(ours.environment.items()), [a for a in argv if "asd" in a or "hccl" in a])
""")
    result = run_python(str(script), check=True)
    assert result.stdout.splitlines() == [
        "npu:1 ['import transfer_to_npu', 'set_device(1)'] hccl nccl",
        "[('HCCL_CONNECT_TIMEOUT', '1200'), ('NPU_ASD_ENABLE', '2')] []"], result.stdout


RNG_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import stand_in_torch_npu
stand_in_torch_npu.install_runtime(device_count=2)
import torch
from aquila_npu import plugin_manager
plugins = plugin_manager.get()
plugins.hook.aquila_npu_prepare_process(device="npu")
if {patched!r}:
    plugins.patch_registry("npu").apply()
from megatron.core import tensor_parallel
generator = torch.npu.default_generators[0]
seeded = lambda seed: torch.Generator().manual_seed(seed)
tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
tracker = tensor_parallel.get_cuda_rng_tracker()
after = generator.get_state().clone()
rank_state = tracker.get_states()["model-parallel-rng"].clone()
if not {patched!r}:
    print(json.dumps({{"default restored": torch.equal(after, seeded(123).get_state())}}))
    sys.exit(0)
with tracker.fork():
    inside = generator.get_state().clone()
    draw = torch.rand(4, generator=generator)  # what dropout draws on this rank's NPU
print(json.dumps({{
    "default restored": torch.equal(after, seeded(123).get_state()),
    "rank state": torch.equal(rank_state, seeded(123 + 2718 + 1).get_state()),
    "fork sets it": torch.equal(inside, rank_state),
    "draws the rank's numbers": torch.equal(draw, torch.rand(4, generator=seeded(123 + 2718 + 1))),
    "fork restores": torch.equal(generator.get_state(), after),
    "tracker advanced": torch.equal(tracker.get_states()["model-parallel-rng"], seeded(123 + 2718 + 1).get_state())
                        is False}}))
"""


@pytest.mark.no_wheel
@pytest.mark.parametrize("patched", [True, False])
def test_model_parallel_rng_states_reach_the_npu_generator(tmp_path, patched):
    """megatron-core's model-parallel RNG tracker on the (stand-in) NPU, through the bridge: with the npu plugin's
    patches the per-rank dropout state (seed + 2718 + tp_rank) is set on the NPU's generator inside ``fork()``,
    draws that rank's numbers, and the default state is restored exactly after it and after seeding. Without them
    (megatron-core's own ``_set_cuda_rng_state`` queues through CUDA's ``_lazy_call``) the default state is never
    restored — the gap the patch closes."""
    import json

    from conftest import run_python

    script = tmp_path / "rng.py"
    script.write_text(RNG_SCRIPT.format(tests=str(Path(__file__).parent), patched=patched))
    result = json.loads(run_python(str(script), check=True).stdout.strip().splitlines()[-1])
    if patched:
        assert all(result.values()), result
    else:
        assert result == {"default restored": False}


PROCESS_SCRIPT = """
import json, multiprocessing, os, sys
import torch
import stand_in_torch_npu as npu


def report():
    import torch
    from megatron.core import jit
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.tensor_parallel import random
    from megatron.core.utils import configure_nvtx_profiling, nvtx_range_pop, nvtx_range_push

    configure_nvtx_profiling(True)
    nvtx_range_push("step")
    nvtx_range_pop("step")
    return {"bridge first": npu.runtime_calls[:1] == ["import transfer_to_npu"],
            "env": os.environ.get("TORCH_TRANSFER_TO_NPU"),
            "cuda rng is the npu's": torch.cuda.get_rng_state is torch.npu.get_rng_state,
            "rng patched": random._set_cuda_rng_state.__module__,
            "jit_fuser": jit.jit_fuser.__name__,
            "bias_swiglu compiled": hasattr(fused_bias_swiglu.bias_swiglu, "_torchdynamo_orig_callable"),
            "mstx": [e[0] for e in torch.npu.mstx.events]}


def child(queue):
    queue.put(report())


if __name__ == "__main__":
    ours = report()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    theirs = queue.get(timeout=120)
    process.join()
    print(json.dumps([ours, theirs]))
"""


@pytest.mark.no_wheel
@pytest.mark.slow
@pytest.mark.parametrize("compile_flag", [None, "1"])
def test_an_npu_job_process_and_its_spawned_child_start_with_the_bridge(tmp_path, compile_flag):
    """A process of a Megatron-LM-route job on the (stand-in) npu device, and a child it spawns (as data-loader
    workers and torch_dist savers are): the start-up hook applied torch_npu's bridge before the script's first line
    (TORCH_TRANSFER_TO_NPU=1 exported for children), so torch.cuda's RNG functions are the NPU's; megatron-core's
    RNG setter is the npu plugin's; its torch.compile fusions are plain functions unless --npu-torch-compile 1;
    Megatron's NVTX ranges become msprof (mstx) ranges instead of raising."""
    import json

    from conftest import run_python

    script = tmp_path / "job.py"
    script.write_text(PROCESS_SCRIPT)
    site = Path(__file__).parent / "stand_in_site"
    env = {"PYTHONPATH": f"{site}:{Path(__file__).parent}", "AQUILA_NPU_PLUGINS": "aquila2",
           "AQUILA_NPU_DEVICE": "npu"}
    if compile_flag:
        env["AQUILA_NPU_TORCH_COMPILE"] = compile_flag
    reports = json.loads(run_python(str(script), env=env, check=True).stdout.strip().splitlines()[-1])
    for report in reports:
        assert report == {"bridge first": True, "env": "1", "cuda rng is the npu's": True,
                          "rng patched": "aquila_npu.plugins.npu",
                          "jit_fuser": "compile" if compile_flag else "noop_decorator",
                          "bias_swiglu compiled": bool(compile_flag),
                          "mstx": ["range_start", "range_end"]}, report
