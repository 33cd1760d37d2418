"""Acceptance: megatron-core, built from our spec, computes what Hugging Face transformers computes.

Random Aquila2-shaped `LlamaForCausalLM` checkpoints (Aquila2's exact weight layout; GQA and MHA variants), text
encoded with the real Aquila2 tokenizer, fp32 logits compared element by element.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aquila_npu import parity, weights

from conftest import make_hf_checkpoint, run_python

HF_TOLERANCE = 1e-4
TP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def mha_hf_dir(tmp_path_factory, tiny_mha_spec):
    return make_hf_checkpoint(tiny_mha_spec, tmp_path_factory.mktemp("hf-mha") / "model", seed=1)


@pytest.fixture(scope="module", params=["gqa", "mha"])
def hf_dir(request, tiny_hf_dir, mha_hf_dir):
    return tiny_hf_dir if request.param == "gqa" else mha_hf_dir


def test_tokens_come_from_the_real_aquila2_tokenizer(sample_tokens, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tokenizer) == 100008
    assert sample_tokens.shape[0] == 3 and sample_tokens.shape[1] >= 16
    assert int(sample_tokens.max()) < 100000  # ordinary BPE ids; specials are 100000..100007


def test_logit_parity_with_transformers_tp1(megatron_world, hf_dir, sample_tokens):
    ours = parity.megatron_logits(str(hf_dir), sample_tokens)
    theirs = parity.hf_logits(str(hf_dir), sample_tokens)
    assert ours.shape == theirs.shape == (*sample_tokens.shape, 100008)
    assert theirs.abs().max() > 0.1  # the comparison is not between near-zero numbers
    assert (ours - theirs).abs().max().item() <= HF_TOLERANCE


def test_every_norm_is_the_device_kernel(megatron_world, tiny_spec):
    """The final norm too: megatron-core would otherwise take its own default for it."""
    from aquila_npu import plugin_manager
    from aquila_npu.model import build_gpt_model

    norm = plugin_manager.get().kernels(megatron_world.device).rms_norm.load()
    model = build_gpt_model(tiny_spec)
    from megatron.core.transformer.identity_op import IdentityOp

    norms = [m for name, m in model.named_modules() if name.endswith("layernorm") and not isinstance(m, IdentityOp)]
    assert len(norms) == 2 * tiny_spec.num_layers + 1 and all(type(m) is norm for m in norms)


def test_parity_detects_a_wrong_weight_mapping(megatron_world, tiny_hf_dir, sample_tokens, monkeypatch):
    """The check can fail: swapping the two norms of each layer (same shapes) is caught."""
    original = weights.hf_to_megatron

    def swapped(*args, **kwargs):
        state = original(*args, **kwargs)
        for key in [k for k in state if k.endswith("input_layernorm.weight")]:
            other = key.replace("input_layernorm", "pre_mlp_layernorm")
            state[key], state[other] = state[other], state[key]
        return state

    monkeypatch.setattr(weights, "hf_to_megatron", swapped)
    ours = parity.megatron_logits(str(tiny_hf_dir), sample_tokens)
    theirs = parity.hf_logits(str(tiny_hf_dir), sample_tokens)
    assert (ours - theirs).abs().max().item() > 100 * HF_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_tensor_parallel_2_gives_the_tp1_logits(tmp_path, variant, tiny_hf_dir, mha_hf_dir, tokens_file,
                                                sample_tokens):
    model = tiny_hf_dir if variant == "gqa" else mha_hf_dir
    outputs = {}
    for tp in (1, 2):
        out = tmp_path / f"logits-tp{tp}.safetensors"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}"]
        run_python(*launcher, "-m", "aquila_npu.parity", "--hf-dir", str(model), "--tokens", str(tokens_file),
                   "--out", str(out), "--device", "cpu", check=True)
        outputs[tp] = load_file(str(out))["logits"]
    assert (outputs[2] - outputs[1]).abs().max().item() <= TP_TOLERANCE
    reference = parity.hf_logits(str(model), sample_tokens)
    assert (outputs[2] - reference).abs().max().item() <= HF_TOLERANCE


@pytest.mark.slow
def test_sequence_parallel_gives_the_same_logits(tmp_path, tiny_hf_dir, tokens_file, sample_tokens):
    """The seed trains with --sequence-parallel: the norms (our kernel) must run on sequence shards."""
    out = tmp_path / "logits-tp2-sp.safetensors"
    run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.parity",
               "--hf-dir", str(tiny_hf_dir), "--tokens", str(tokens_file), "--out", str(out), "--device", "cpu",
               "--sequence-parallel", check=True)
    reference = parity.hf_logits(str(tiny_hf_dir), sample_tokens)
    assert (load_file(str(out))["logits"] - reference).abs().max().item() <= HF_TOLERANCE


def test_vocab_padding_rows_are_zero_and_sliced_off(tiny_spec):
    hf = {"model.embed_tokens.weight": torch.randn(tiny_spec.vocab_size, 8)}
    padded = weights.pad_vocab(hf["model.embed_tokens.weight"], tiny_spec.padded_vocab_size(16))
    assert padded.shape[0] == 100016 and padded[100008:].abs().sum() == 0
    assert torch.equal(padded[:100008], hf["model.embed_tokens.weight"])


def test_qkv_packing_matches_megatron_group_layout(tiny_spec):
    """Per query group: its query heads, then one key head, then one value head; TP splits whole groups."""
    d, h, groups = tiny_spec.kv_channels, tiny_spec.hidden_size, tiny_spec.num_query_groups
    per_group = tiny_spec.num_attention_heads // groups
    q = torch.arange(tiny_spec.num_attention_heads * d * h, dtype=torch.float32).reshape(-1, h)
    k, v = -torch.ones(groups * d, h), torch.full((groups * d, h), 7.0)
    packed = weights.pack_qkv(q, k, v, tiny_spec)
    rows = (per_group + 2) * d
    for g in range(groups):
        block = packed[g * rows:(g + 1) * rows]
        assert torch.equal(block[:per_group * d], q[g * per_group * d:(g + 1) * per_group * d])
        assert torch.equal(block[per_group * d:(per_group + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(block[(per_group + 1) * d:], v[g * d:(g + 1) * d])
    halves = [weights.pack_qkv(q, k, v, tiny_spec, 2, r) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), packed)
