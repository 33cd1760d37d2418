"""The 16K models: linear RoPE scaling (``rope_scaling: {type: linear, factor}`` in the HF config; megatron-core's
``seq_len_interpolation_factor``; Megatron-LM's ``--rotary-seq-len-interpolation-factor``), held to
``transformers``' own implementation of the same scaling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from aquila_npu import parity
from aquila_npu.errors import AquilaNpuError
from aquila_npu.plugins.aquila2 import FAMILY
from conftest import make_hf_checkpoint
from test_specs import AQUILA2_7B_CONFIG, AQUILA2_34B_CONFIG

FACTOR = 4.0


def linear_scaling(config: dict) -> tuple:
    """(type, factor) of a config.json: BAAI's and transformers 4's ``rope_scaling`` or transformers 5's
    ``rope_parameters``."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return scaling.get("rope_type") or scaling.get("type"), scaling.get("factor")


@pytest.fixture(scope="module")
def scaled_spec(tiny_spec):
    """aquila2-tiny stretched as the 16K models are: 256 trained positions read as 4 x 256."""
    return tiny_spec.replace(seq_length=1024, max_position_embeddings=1024,
                             rotary_seq_len_interpolation_factor=FACTOR)


@pytest.fixture(scope="module")
def scaled_hf_dir(tmp_path_factory, scaled_spec):
    return make_hf_checkpoint(scaled_spec, tmp_path_factory.mktemp("hf-scaled") / "model", seed=3)


def test_linear_scaling_gives_transformers_logits_beyond_the_unscaled_length(megatron_world, scaled_hf_dir,
                                                                              tmp_path):
    config = json.loads((scaled_hf_dir / "config.json").read_text())
    assert linear_scaling(config) == ("linear", FACTOR)  # written by transformers itself
    tokens = torch.randint(0, 100000, (1, 320), generator=torch.Generator().manual_seed(0))  # 320 > 1024 / 4
    ours = parity.megatron_logits(str(scaled_hf_dir), tokens)
    theirs = parity.hf_logits(str(scaled_hf_dir), tokens)
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-4

    # the scaling is what makes them agree: the same weights without it differ
    unscaled = tmp_path / "unscaled"
    shutil.copytree(scaled_hf_dir, unscaled)
    plain = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")}
    (unscaled / "config.json").write_text(json.dumps({**plain, "rope_theta": 10000.0}))
    assert (parity.hf_logits(str(unscaled), tokens) - theirs)[:, 1:].abs().max().item() > 1e-2


def test_conversion_keeps_the_scaling_both_ways(tmp_path, scaled_hf_dir, scaled_spec):
    from aquila_npu.convert import ConvertOptions, convert
    from aquila_npu.convert.hf_format import load_state
    from aquila_npu.convert.megatron_format import MegatronCheckpoint

    for fmt in ("torch", "torch_dist"):
        convert(ConvertOptions(load_dir=str(scaled_hf_dir), save_dir=str(tmp_path / fmt), ckpt_format=fmt,
                               target_tensor_parallel_size=2, progress=False))
        if fmt == "torch":
            spec = MegatronCheckpoint(str(tmp_path / fmt)).spec
            assert spec.rotary_seq_len_interpolation_factor == FACTOR
        convert(ConvertOptions(load_dir=str(tmp_path / fmt), save_dir=str(tmp_path / f"{fmt}-hf"),
                               load_model_type="mg", save_model_type="hf", progress=False))
        back = json.loads((tmp_path / f"{fmt}-hf" / "config.json").read_text())
        assert back["rope_scaling"] == {"type": "linear", "factor": FACTOR}
        original, again = load_state(str(scaled_hf_dir)), load_state(str(tmp_path / f"{fmt}-hf"))
        assert sorted(original) == sorted(again) and all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize("config,name,factor", [
    ({**AQUILA2_7B_CONFIG, "max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 8.0}},
     "aquila2-7b-16k", "8"),
    ({**AQUILA2_34B_CONFIG, "max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 4.0}},
     "aquila2-34b-16k", "4"),
    # transformers 5 saves the same as rope_parameters
    ({**AQUILA2_34B_CONFIG, "max_position_embeddings": 16384,
      "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, "aquila2-34b-16k", "4"),
])
def test_the_16k_specs(config, name, factor):
    spec = FAMILY.spec_from_hf_config(config)
    assert spec == FAMILY.spec(name)
    assert spec.max_position_embeddings == 16384
    assert spec.megatron_lm_flags()["--rotary-seq-len-interpolation-factor"] == factor
    assert FAMILY.chat_template(name).name == "aquila"
    assert "--rotary-seq-len-interpolation-factor" not in FAMILY.spec("aquila2-7b").megatron_lm_flags()


@pytest.mark.parametrize("scaling,message", [
    ({"type": "dynamic", "factor": 2.0}, "unsupported RoPE scaling 'dynamic'"),
    ({"rope_type": "yarn", "factor": 4.0}, "unsupported RoPE scaling 'yarn'"),
    ({"type": "linear"}, "linear RoPE scaling needs a numeric factor"),
    ({"type": "linear", "factor": 0.5}, "linear RoPE scaling needs a numeric factor >= 1"),
])
def test_other_scalings_are_refused_in_one_line(scaling, message):
    with pytest.raises(AquilaNpuError, match=message):
        FAMILY.spec_from_hf_config({**AQUILA2_7B_CONFIG, "rope_scaling": scaling})


def test_the_driver_takes_the_factor_as_an_architecture_flag():
    from aquila_npu.training.arguments import parse

    args = parse(["--model", "aquila2-7b", "--rotary-seq-len-interpolation-factor", "2", "--max-position-embeddings",
                  "4096", "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--train-iters", "1", "--lr", "1e-4", "--mock-data"])
    assert args.rotary_seq_len_interpolation_factor == 2.0
