"""The kernels that run here against the plain-PyTorch reference (forward and backward, fp32 and bf16, GQA and odd
shapes), alone and in a whole aquila2-tiny; how a device's kernels are chosen. (The NPU kernels: test_kernels_npu.)"""

from __future__ import annotations

import pytest
import torch

from aquila_npu.kernels.reference import RMSNorm, rms_norm
from kernel_checks import DEVICES, attention_inputs, rotary_angles, same_forward_backward, same_model_outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype)
    theirs = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.1 * torch.randn(64))
    assert torch.equal(rms_norm(x, theirs.weight, 1e-5), theirs(x))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_norm_weight_is_marked_for_sequence_parallel_grad_reduction(tiny_spec, sequence_parallel):
    config = tiny_spec.transformer_config(use_cpu_initialization=True, sequence_parallel=sequence_parallel,
                                          tensor_model_parallel_size=2 if sequence_parallel else 1)
    norm = RMSNorm(config, hidden_size=tiny_spec.hidden_size, eps=tiny_spec.norm_epsilon)
    assert norm.weight.sequence_parallel is sequence_parallel
    assert torch.equal(norm.weight, torch.ones(tiny_spec.hidden_size))


# ------------------------------------------------------------------ PyTorch's fused kernels (CUDA; CPU when asked)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 45), (2, 128)])
def test_pytorch_rms_norm_matches_the_reference(dtype, shape, device):
    from aquila_npu.kernels import pytorch, reference

    torch.manual_seed(0)
    x, w = torch.randn(*shape), 1 + 0.1 * torch.randn(shape[-1])
    same_forward_backward(lambda x, w: pytorch.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5),
                          [x, w], dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_attention_matches_the_reference(dtype, heads, groups, padded, device):
    from aquila_npu.kernels import pytorch, reference

    d = 16
    q, k, v, mask = attention_inputs(9, 3, heads, groups, d, padded, seed=2)
    on_device = None if mask is None else mask.to(device)
    same_forward_backward(lambda q, k, v: pytorch.attention(q, k, v, d ** -0.5, on_device),
                          lambda q, k, v: reference.attention(q, k, v, d ** -0.5, mask), [q, k, v], dtype, device)


def test_sdpa_attention_decoding_sees_every_cached_key():
    """One query at the end of 6 cached keys (sq != sk): SDPA's own causal flag would align them top-left."""
    from aquila_npu.kernels import pytorch, reference

    torch.manual_seed(5)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    torch.testing.assert_close(pytorch.attention(q, k, v, 0.3), reference.attention(q, k, v, 0.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megatron_core_fused_swiglu_matches_the_reference(dtype, device):
    """The CUDA device's SwiGLU: megatron-core's fused bias-SwiGLU (torch.compile, which also compiles here)."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from aquila_npu.kernels import reference

    torch.manual_seed(4)
    same_forward_backward(lambda x: bias_swiglu_impl(x, None), reference.swiglu, [torch.randn(7, 3, 2 * 24)], dtype,
                          device)


@pytest.mark.parametrize("rot_dim", [16, 8])
def test_the_rotary_slot_adapter_equals_megatron_cores_rope(rot_dim):
    """A rotate-half kernel in megatron-core's fused-RoPE slot computes what megatron-core's own RoPE does, also when
    the rotary dimension is smaller than the head (the rest passes through)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from aquila_npu.kernels import reference
    from aquila_npu.kernels.seams import megatron_rotary_slot

    torch.manual_seed(6)
    s, d = 7, 16
    freqs = rotary_angles(s, rot_dim)[:, None, None, :]
    slot = megatron_rotary_slot(reference.apply_rotary)
    same_forward_backward(lambda t: slot(t, freqs), lambda t: _apply_rotary_pos_emb_bshd(t, freqs),
                          [torch.randn(s, 3, 5, d)], torch.float32)


@pytest.mark.parametrize("heads, groups", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("sq, sk", [(9, 9), (1, 6), (3, 7)])
def test_flash_attn_contract(monkeypatch, heads, groups, sq, sk):
    """Contract test (flash-attn needs a GPU): against a stand-in flash_attn (tests/stand_in_flash_attn.py) that
    implements flash_attn_func's documented conventions with reference math and asserts them, the flash kernel
    equals the reference in bf16 for training (sq = sk) and decoding shapes; a masked or fp32 call never reaches
    flash-attn (SDPA takes it)."""
    import sys

    import stand_in_flash_attn

    from aquila_npu.kernels import flash, reference

    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn)
    stand_in_flash_attn.calls.clear()
    q, _, _, _ = attention_inputs(sq, 2, heads, groups, 16, False, seed=7)
    _, k, v, _ = attention_inputs(sk, 2, heads, groups, 16, False, seed=8)
    mask = reference.causal_mask(sq, sk)
    same_forward_backward(lambda q, k, v: flash.attention(q, k, v, 0.25), lambda q, k, v: reference.attention(
        q, k, v, 0.25, mask), [q, k, v], torch.bfloat16)
    assert stand_in_flash_attn.calls == ["flash_attn_func"]
    flash.attention(q, k, v, 0.25)  # fp32
    flash.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25, mask)  # masked
    assert stand_in_flash_attn.calls == ["flash_attn_func"]


# ------------------------------------------------------------------ choosing kernels
def test_each_device_has_its_defaults_and_flags_choose():
    from aquila_npu import plugin_manager
    from aquila_npu.kernels.seams import OPS

    plugins = plugin_manager.get()
    assert plugins.kernels("cpu").fused == set()
    assert plugins.kernels("npu").fused == set(OPS)
    cuda = plugins.kernels("cuda").fused
    assert {"rms_norm", "attention", "swiglu"} <= cuda  # rotary too where Transformer Engine is installed
    assert plugins.kernels("cpu", {"rms_norm": True, "attention": True}).fused == {"rms_norm", "attention"}
    assert plugins.kernels("npu", {"swiglu": False}).fused == set(OPS) - {"swiglu"}
    assert plugins.kernels("cpu", {"rms_norm": False}).fused == set()


@pytest.mark.parametrize("op, flag", [("rotary", "--use-fused-rotary-pos-emb"), ("swiglu", "--use-fused-swiglu")])
def test_a_fused_kernel_the_device_lacks_is_a_clear_error(op, flag):
    from aquila_npu import plugin_manager
    from aquila_npu.errors import AquilaNpuError

    with pytest.raises(AquilaNpuError) as error:
        plugin_manager.get().kernels("cpu", {op: True})
    assert str(error.value) == (f"{flag}: the cpu device has no fused {op} kernel (its fused kernels: "
                                "--use-fused-rmsnorm, --use-flash-attn); drop the flag, or run on a device that has "
                                "one (see `aquila-npu doctor`)")


def _count_calls(monkeypatch, owner, name: str) -> list:
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_aquila2_tiny_with_the_cpu_fused_kernels_matches_the_reference(megatron_world, tiny_spec, monkeypatch):
    """The seed's --use-fused-rmsnorm --use-flash-attn on the CPU: PyTorch's kernels in a whole aquila2-tiny (GQA)
    give the reference's logits and weight gradients."""
    from aquila_npu import plugin_manager
    from aquila_npu.kernels import pytorch

    plugins = plugin_manager.get()
    norms, attentions = (_count_calls(monkeypatch, pytorch.F, name) for name in
                         ("rms_norm", "scaled_dot_product_attention"))
    same_model_outputs(tiny_spec, plugins.kernels("cpu", {"rms_norm": True, "attention": True}), plugins.kernels("cpu"))
    assert len(norms) == 2 * tiny_spec.num_layers + 1 and len(attentions) == tiny_spec.num_layers


def test_aquila2_tiny_with_the_cuda_kernel_set_matches_the_reference(megatron_world, tiny_spec, monkeypatch):
    """Every kernel of the CUDA device's set that runs on a CPU (all but Transformer Engine's), in a whole
    aquila2-tiny: PyTorch's RMSNorm and SDPA, megatron-core's fused bias-SwiGLU."""
    import importlib.util

    from megatron.core.transformer import mlp

    from aquila_npu import plugin_manager

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine's kernels need a GPU")
    plugins = plugin_manager.get()
    kernels = plugins.kernels("cuda")
    assert kernels.config_overrides()["bias_activation_fusion"] is True
    swiglus = _count_calls(monkeypatch, mlp, "bias_swiglu_impl")
    same_model_outputs(tiny_spec, kernels, plugins.kernels("cpu"))
    assert len(swiglus) == tiny_spec.num_layers  # megatron-core's fused path ran (the reference model's did not)


def test_a_world_keeps_the_kernels_it_was_made_with(megatron_world):
    """Joining this process's megatron world with other kernel flags is an error, not silently the old kernels."""
    from aquila_npu import distributed
    from aquila_npu.errors import AquilaNpuError

    fused = "attention" in megatron_world.kernels.fused
    assert distributed.initialize(kernels={"attention": fused}) is megatron_world  # the same choice: joins
    with pytest.raises(AquilaNpuError, match="initialised with other kernels"):
        distributed.initialize(kernels={"attention": not fused})


def _core_attention_pair(spec, dtype):
    """The reference path's core attention (ours) and megatron-core's ``DotProductAttention``, for ``spec`` in
    ``dtype`` (neither has weights)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from aquila_npu.kernels import megatron_core

    config = spec.transformer_config(use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    return [cls(config, 1, AttnMaskType.causal, "self") for cls in (megatron_core.DotProductAttention,
                                                                    DotProductAttention)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq, sk, batch, padded", [(1, 37, 1, False), (1, 45, 3, True), (7, 7, 2, False),
                                                    (5, 20, 3, True)])
def test_megatron_core_attention_without_autograd_reads_grouped_kv_in_place(dtype, sq, sk, batch, padded, tiny_spec,
                                                                           megatron_world, monkeypatch):
    """Generation on the reference path (decode steps against a static KV cache, prefills, left-padded batches):
    our ``DotProductAttention`` gives megatron-core's values without repeating the cache's key/value heads, which
    megatron-core does at every step (a copy of the whole cache)."""
    from aquila_npu.generate.batching import padding_mask

    assert tiny_spec.num_attention_heads > tiny_spec.num_query_groups, "a grouped-query spec is what is tested"
    ours, theirs = _core_attention_pair(tiny_spec, dtype)
    generator = torch.Generator().manual_seed(sk)
    heads, groups, d = tiny_spec.num_attention_heads, tiny_spec.num_query_groups, tiny_spec.kv_channels
    # key/value: the first sk positions and `batch` rows of a larger cache [max_length, max_batch, groups, d]
    cache_k, cache_v = (torch.randn(64, 4, groups, d, generator=generator).to(dtype) for _ in range(2))
    key, value = cache_k[:sk, :batch], cache_v[:sk, :batch]
    query = torch.randn(sq, batch, heads, d, generator=generator).to(dtype)
    full = padding_mask([0, 2, 4][:batch] if padded else [0] * batch, sk, "cpu")
    mask = full[:, :, sk - sq:]  # the rows of the last sq queries (one at a decode step)
    repeats = _count_calls(monkeypatch, torch.Tensor, "repeat_interleave")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            repeats.clear()
            out = ours(query, key, value, mask)
            assert repeats == []
            expected = theirs(query, key, value, mask)
            assert len(repeats) == 2, "megatron-core repeats keys and values (what the check above would catch)"
        assert out.shape == expected.shape == (sq, batch, heads * d)
        # the same products, but BLAS may sum a matrix-vector product in another order than megatron-core's
        # (queries stacked per group): equal to within a rounding
        torch.testing.assert_close(out, expected)


def test_megatron_core_attention_with_autograd_is_megatron_cores(tiny_spec, megatron_world):
    """Training goes through megatron-core's own forward: the same outputs and input gradients, bit for bit."""
    from kernel_checks import attention_inputs

    ours, theirs = _core_attention_pair(tiny_spec, torch.float32)
    inputs = attention_inputs(9, 3, tiny_spec.num_attention_heads, tiny_spec.num_query_groups,
                              tiny_spec.kv_channels, padded=True, seed=5)
    results = []
    for module in (ours, theirs):
        q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
        out = module(q, k, v, inputs[3])
        out.backward(torch.ones_like(out))
        results.append((out, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
