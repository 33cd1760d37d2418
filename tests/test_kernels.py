"""Reference kernels: RMSNorm as Aquila2/Llama compute it, usable under sequence parallelism."""

from __future__ import annotations

import pytest
import torch

from aquila_npu.kernels.reference import RMSNorm, rms_norm


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
