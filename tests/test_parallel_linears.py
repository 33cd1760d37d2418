"""The layer spec's parallel linears (``aquila_npu.parallel_linears``) against megatron-core's own: without gradients
at one tensor-parallel rank they take the bare product and give megatron-core's values bit for bit; otherwise they
are megatron-core's forward, gradients included."""

from __future__ import annotations

import functools

import pytest
import torch


def linear_pair(kind: str, bias: bool, skip_bias_add: bool, spec):
    """Ours and megatron-core's linear of ``kind`` (column or row), with the same weights."""
    from megatron.core.tensor_parallel import layers as megatron_layers

    from aquila_npu import parallel_linears

    config = spec.transformer_config(use_cpu_initialization=True)
    name = {"column": "ColumnParallelLinear", "row": "RowParallelLinear"}[kind]
    extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
    pair = [getattr(module, name)(64, 96 if kind == "column" else 48, config=config, init_method=torch.nn.init.normal_,
                                  bias=bias, skip_bias_add=skip_bias_add, **extra)
            for module in (parallel_linears, megatron_layers)]
    pair[1].load_state_dict(pair[0].state_dict())
    if bias:
        with torch.no_grad():
            for linear in pair:
                linear.bias.copy_(torch.arange(linear.bias.numel(), dtype=linear.bias.dtype) / 7)
    return pair


def record_calls(monkeypatch, name: str) -> list:
    """Calls of megatron-core's ``tensor_parallel.layers.<name>`` from now on (one entry each)."""
    from megatron.core.tensor_parallel import layers as megatron_layers

    calls = []
    original = getattr(megatron_layers, name)

    @functools.wraps(original)  # with its attributes: some keep a 'warned' flag on themselves
    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(megatron_layers, name, recording)
    return calls


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias, skip_bias_add", [(False, False), (True, False), (True, True)])
def test_without_gradients_the_bare_product_equals_megatron_cores_bit_for_bit(kind, bias, skip_bias_add, tiny_spec,
                                                                             megatron_world, monkeypatch):
    ours, theirs = linear_pair(kind, bias, skip_bias_add, tiny_spec)
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(3))
    calls = record_calls(monkeypatch, "linear_with_frozen_weight")
    for linear in (ours, theirs):
        linear.requires_grad_(False)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            calls.clear()
            (out, out_bias), (ref, ref_bias) = ours(x), theirs(x)
            assert len(calls) == 1, "only megatron-core's linear goes through its autograd function"
            assert torch.equal(out, ref)
            assert (out_bias is None) == (ref_bias is None) and (out_bias is None or torch.equal(out_bias, ref_bias))
            assert (out_bias is not None) == skip_bias_add


@pytest.mark.parametrize("kind", ["column", "row"])
def test_with_gradients_the_forward_and_gradients_are_megatron_cores(kind, tiny_spec, megatron_world, monkeypatch):
    ours, theirs = linear_pair(kind, True, False, tiny_spec)
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(4))
    calls = record_calls(monkeypatch, "linear_with_grad_accumulation_and_async_allreduce")
    grads = []
    for linear in (ours, theirs):
        inputs = x.clone().requires_grad_(True)
        output, _ = linear(inputs)
        output.square().sum().backward()
        grads.append((output.detach(), inputs.grad, linear.weight.grad, linear.bias.grad))
    assert len(calls) == 2, "both went through megatron-core's autograd function"
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_the_layer_spec_builds_them(tiny_spec, megatron_world):
    from megatron.core.models.gpt import GPTModel

    from aquila_npu import layers, parallel_linears
    from aquila_npu.kernels.seams import choose

    model = GPTModel(config=tiny_spec.transformer_config(use_cpu_initialization=True),
                     transformer_layer_spec=layers.layer_spec(choose("cpu", None)), vocab_size=tiny_spec.vocab_size,
                     max_sequence_length=tiny_spec.max_position_embeddings, position_embedding_type="rope")
    layer = model.decoder.layers[0]
    assert type(layer.self_attention.linear_qkv) is parallel_linears.ColumnParallelLinear
    assert type(layer.self_attention.linear_proj) is parallel_linears.RowParallelLinear
    assert type(layer.mlp.linear_fc1) is parallel_linears.ColumnParallelLinear
    assert type(layer.mlp.linear_fc2) is parallel_linears.RowParallelLinear
