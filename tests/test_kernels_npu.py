"""NPU kernel contract tests (no NPU here): ``aquila_npu.kernels.npu`` calls torch_npu's fused operators; a stand-in
``torch_npu`` (tests/stand_in_torch_npu.py) implements their documented signatures with reference math and asserts
their conventions. Each NPU kernel must then equal the plain-PyTorch reference, forward and backward, in fp32 and
bf16, over GQA and odd shapes. This verifies our glue; it says nothing of real NPU numerics or speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stand_in_torch_npu
from kernel_checks import attention_inputs, rotary_tables, same_forward_backward, same_model_outputs


@pytest.fixture(autouse=True)
def torch_npu(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", stand_in_torch_npu)
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


def test_the_stand_in_rejects_what_an_npu_would():
    """The stand-in's asserts are the contract: an inverted (float) mask, a wrong layout or an odd swiglu width
    fail here as they would on the device."""
    q = torch.randn(4, 1, 8)
    with pytest.raises(AssertionError, match="boolean"):
        stand_in_torch_npu.npu_fusion_attention(q, q, q, 2, "SBH", atten_mask=torch.zeros(4, 4), scale=1.0)
    with pytest.raises(AssertionError, match="SBH"):
        stand_in_torch_npu.npu_fusion_attention(q, q, q, 2, "BSH", atten_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(AssertionError, match="even"):
        stand_in_torch_npu.npu_swiglu(torch.randn(3, 5))


def test_decoding_with_a_kv_cache_sees_every_cached_key():
    """One query at the end of 6 cached keys (sq != sk): the NPU call passes an explicit mask, no causal window."""
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(5)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    torch.testing.assert_close(npu.attention(q, k, v, 0.3), reference.attention(q, k, v, 0.3))


def test_aquila2_tiny_through_the_npu_plugin_matches_the_reference(megatron_world, tiny_spec):
    """The npu plugin's kernels in a whole aquila2-tiny (GQA), all four on by default (npu_rotary_mul through the
    plugin's patch of megatron-core's fused-RoPE slot): logits and every weight gradient equal those of the reference
    kernels for the same weights (on this CPU, with the stand-in torch_npu)."""
    from aquila_npu import plugin_manager
    from aquila_npu.kernels import OPS

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


def test_the_npu_flags_turn_each_fused_kernel_off(megatron_world, tiny_spec):
    """--no-use-fused-rotary-pos-emb and --no-use-flash-attn: megatron-core's RoPE and attention run, the other two
    fused kernels still do."""
    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    kernels = plugins.kernels("npu", {"rotary": False, "attention": False})
    assert kernels.fused == {"rms_norm", "swiglu"}
    same_model_outputs(tiny_spec, kernels, plugins.kernels("cpu"))
    assert set(stand_in_torch_npu.calls) == {"npu_rms_norm", "npu_swiglu"}


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
from aquila_npu import megatron_lm
argv, ours, _ = megatron_lm.expand_argv(["--plugin", "aquila2", "--npu-asd-enable", "2",
                                         "--hccl-connect-timeout=1200", "--seq-length", "64"], plugins)
print(sorted(ours.environment.items()), [a for a in argv if "asd" in a or "hccl" in a])
""")
    result = run_python(str(script), check=True)
    assert result.stdout.splitlines() == [
        "npu:1 ['import transfer_to_npu', 'set_device(1)'] hccl nccl",
        "[('HCCL_CONNECT_TIMEOUT', '1200'), ('NPU_ASD_ENABLE', '2')] []"], result.stdout
