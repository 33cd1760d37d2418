"""NPU kernel contract tests (no NPU here): ``aquila_npu.kernels.npu`` calls torch_npu's fused operators; a stand-in
``torch_npu`` (tests/stand_in_torch_npu.py) implements their documented signatures with reference math and asserts
their conventions. Each NPU kernel must then equal the plain-PyTorch reference, forward and backward, in fp32 and
bf16, over GQA and odd shapes. This verifies our glue; it says nothing of real NPU numerics or speed."""

from __future__ import annotations

import pytest
import torch

import stand_in_torch_npu

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def torch_npu(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", stand_in_torch_npu)
    stand_in_torch_npu.calls.clear()
    return stand_in_torch_npu


def _check(npu_fn, ref_fn, inputs, dtype, op):
    """Forward and input gradients of the NPU kernel equal the reference's (same upstream gradient)."""
    ours = [x.detach().clone().to(dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    theirs = [x.detach().clone().to(dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    out_npu, out_ref = npu_fn(*ours), ref_fn(*theirs)
    torch.testing.assert_close(out_npu, out_ref, **TOLERANCE[dtype])
    grad = torch.randn_like(out_ref)
    out_npu.backward(grad)
    out_ref.backward(grad)
    for a, b in zip(ours, theirs):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **TOLERANCE[dtype])
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
    freqs = torch.outer(torch.arange(s).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), dim=-1)
    shape, table = ((s, b, n, d), emb[:, None, None, :]) if layout == "sbhd" else ((b, s, n, d), emb[None, :, None, :])
    t = torch.randn(*shape)
    _check(lambda t, c, s_: npu.apply_rotary(t, c, s_), lambda t, c, s_: reference.apply_rotary(t, c, s_),
           [t, table.cos(), table.sin()], dtype, "npu_rotary_mul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention(dtype, heads, groups, padded):
    from aquila_npu.kernels import npu, reference

    torch.manual_seed(2)
    s, b, d = 9, 3, 16
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    mask = None
    if padded:  # left padding, as generation batches it: rows 1 and 2 start with 2 and 4 padding keys
        from aquila_npu.generate.batching import padding_mask

        mask = padding_mask([0, 2, 4], s, "cpu")
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
    """The npu plugin's kernel set in a whole aquila2-tiny (GQA): logits and every weight gradient equal those of the
    reference kernels for the same weights (on this CPU, with the stand-in torch_npu)."""
    from aquila_npu import plugin_manager
    from aquila_npu.model import build_gpt_model

    npu_set = plugin_manager.get().kernels("npu")
    assert npu_set.name == "npu-fused"
    models = []
    for kernels in (plugin_manager.get().kernels("cpu"), npu_set):
        torch.manual_seed(0)
        model = build_gpt_model(tiny_spec, kernels=kernels, parallel_output=False, params_dtype=torch.float32)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    tokens = torch.randint(0, tiny_spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16)[None].expand(2, 16)
    stand_in_torch_npu.calls.clear()
    outputs = [model(tokens, positions, None) for model in models]
    used = set(stand_in_torch_npu.calls)
    assert used == {"npu_rms_norm", "npu_fusion_attention", "npu_swiglu"}
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for output in outputs:
        output.float().logsumexp(-1).sum().backward()
    grads = [{n: p.grad for n, p in model.named_parameters()} for model in models]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)

