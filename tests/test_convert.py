"""Checkpoint conversion: bit-exact round trips at every split, loading by megatron-core and transformers, and
one clear line (with nothing left behind) for each kind of bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aquila_npu import parity
from aquila_npu.convert import ConvertOptions, convert
from aquila_npu.convert.hf_format import load_state
from aquila_npu.convert.megatron_format import MegatronCheckpoint
from aquila_npu.errors import AquilaNpuError

from conftest import run_python


def hf_state(path) -> dict[str, torch.Tensor]:
    return load_state(str(path))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def shaped_7b(tmp_path_factory, tiny_spec):
    """7B-shaped: multi-head attention (a query group per head), fp16 like the published 7B."""
    spec = tiny_spec.replace(name="tiny-7b-shape", num_query_groups=8, num_layers=4)
    return parity.save_random_hf_model(spec, str(tmp_path_factory.mktemp("hf7b") / "m"), seed=3,
                                       dtype=torch.float16, max_shard_size="20MB")


@pytest.fixture(scope="module")
def shaped_34b(tmp_path_factory, tiny_spec):
    """34B-shaped: 48 heads in 8 query groups scaled down to 24 heads in 4 groups (6 per group), bf16."""
    spec = tiny_spec.replace(name="tiny-34b-shape", hidden_size=192, ffn_hidden_size=384, num_attention_heads=24,
                             num_query_groups=4, num_layers=4)
    return parity.save_random_hf_model(spec, str(tmp_path_factory.mktemp("hf34b") / "m"), seed=4,
                                       dtype=torch.bfloat16)


def run_convert(load, save, load_type="hf", save_type="mg", tp=1, pp=1, **kwargs):
    return convert(ConvertOptions(load_dir=str(load), save_dir=str(save), load_model_type=load_type,
                                  save_model_type=save_type, target_tensor_parallel_size=tp,
                                  target_pipeline_parallel_size=pp, progress=False, **kwargs))


@pytest.mark.parametrize("shape", ["7b", "34b"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path, shape, tp, pp, shaped_7b, shaped_34b):
    source = shaped_7b if shape == "7b" else shaped_34b
    run_convert(source, tmp_path / "mg", tp=tp, pp=pp)
    checkpoint = MegatronCheckpoint(str(tmp_path / "mg"))
    assert (checkpoint.parallel.tp, checkpoint.parallel.pp) == (tp, pp)
    run_convert(tmp_path / "mg", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(source), hf_state(tmp_path / "hf"))


def test_resplit_tp2_pp2_to_tp4_pp1_to_hf(tmp_path, shaped_34b):
    run_convert(shaped_34b, tmp_path / "a", tp=2, pp=2)
    run_convert(tmp_path / "a", tmp_path / "b", load_type="mg", save_type="mg", tp=4, pp=1)
    run_convert(tmp_path / "b", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(shaped_34b), hf_state(tmp_path / "hf"))


def test_virtual_pipeline_chunks(tmp_path, shaped_7b):
    run_convert(shaped_7b, tmp_path / "mg", tp=2, pp=2, num_layers_per_virtual_pipeline_stage=1)
    state = torch.load(tmp_path / "mg/iter_0000001/mp_rank_00_001/model_optim_rng.pt", weights_only=False)
    assert {"model0", "model1"} <= set(state) and "model" not in state
    # stage 1 holds global layers 1 and 3 (chunk 0 and chunk 1), each numbered 0 locally
    assert "decoder.layers.0.mlp.linear_fc1.weight" in state["model1"]
    assert "output_layer.weight" in state["model1"] and "output_layer.weight" not in state["model0"]
    run_convert(tmp_path / "mg", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(shaped_7b), hf_state(tmp_path / "hf"))


def test_params_dtype_and_seed_flag_sets(tmp_path, shaped_34b, tokenizer_dir):
    """The seed's two command lines, unchanged: HF -> Megatron TP2 (bf16), then Megatron -> <save-dir>/mg2hg."""
    mg, hf_dir = tmp_path / "mg", tmp_path / "hf-original"
    shutil.copytree(shaped_34b, hf_dir)
    run_python("-m", "aquila_npu.convert", "--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron",
               "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "1", "--load-dir",
               str(hf_dir), "--save-dir", str(mg), "--tokenizer-model", str(tokenizer_dir / "tokenizer.json"),
               "--params-dtype", "fp32", check=True)
    assert MegatronCheckpoint(str(mg)).tensor("model.norm.weight").dtype == torch.float32
    result = run_python("-m", "aquila_npu.convert", "--model-type", "GPT", "--loader", "megatron", "--saver",
                        "megatron", "--save-model-type", "save_huggingface_llama", "--target-tensor-parallel-size",
                        "1", "--target-pipeline-parallel-size", "1", "--load-dir", str(mg), "--save-dir",
                        str(hf_dir), "--params-dtype", "bf16", "--tokenizer-model", str(tokenizer_dir), check=True)
    assert "mg2hg" in result.stdout
    assert_bit_identical(hf_state(shaped_34b), hf_state(hf_dir / "mg2hg"))  # bf16 -> fp32 -> bf16 is exact
    assert (hf_dir / "mg2hg" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_hf_output_loads_in_transformers_without_remote_code(tmp_path, tiny_hf_dir, sample_tokens):
    from transformers import AutoConfig, AutoModelForCausalLM

    run_convert(tiny_hf_dir, tmp_path / "mg", tp=2, pp=2)
    run_convert(tmp_path / "mg", tmp_path / "hf", load_type="mg", save_type="hf", max_shard_bytes=10 * 2**20)
    files = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    assert sum(f.startswith("model-") for f in files) > 1  # sharded
    config = AutoConfig.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    assert config.architectures == ["LlamaForCausalLM"] and config.bos_token_id == 100006
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False, dtype=torch.float32)
    with torch.no_grad():
        logits = model(sample_tokens).logits
    assert torch.equal(logits, parity.hf_logits(str(tiny_hf_dir), sample_tokens))


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_converted_checkpoint_loaded_by_megatron_core_at_tp2_gives_hf_logits(tmp_path, ckpt_format, tiny_hf_dir,
                                                                             tokens_file, sample_tokens):
    """Two gloo processes load the conversion with megatron-core's own loaders: this rank's file into
    GPTModel.load_state_dict (torch), or dist_checkpointing.load of the sharded state dict (torch_dist)."""
    run_convert(tiny_hf_dir, tmp_path / "mg", tp=2, ckpt_format=ckpt_format)
    out = tmp_path / "logits.safetensors"
    run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.parity",
               "--megatron-dir", str(tmp_path / "mg"), "--tokens", str(tokens_file), "--out", str(out),
               "--device", "cpu", check=True)
    reference = parity.hf_logits(str(tiny_hf_dir), sample_tokens)
    assert (load_file(str(out))["logits"] - reference).abs().max().item() <= 1e-4


def test_reads_pytorch_bin_and_aquila_configs(tmp_path, tiny_hf_dir):
    """`pytorch_model.bin` (weights-only) and Aquila2's own AquilaForCausalLM config.json (never executed)."""
    source = tmp_path / "bin"
    source.mkdir()
    torch.save(hf_state(tiny_hf_dir), source / "pytorch_model.bin")
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config.update(architectures=["AquilaForCausalLM"], model_type="aquila",
                  auto_map={"AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"})
    (source / "config.json").write_text(json.dumps(config))
    run_convert(source, tmp_path / "mg", tp=2)
    run_convert(tmp_path / "mg", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(tiny_hf_dir), hf_state(tmp_path / "hf"))


# ----------------------------------------------------------------------------------- bad input
class NotWeights:
    def __reduce__(self):
        return (print, ("this would run code at load time",))


def _break(kind: str, tmp_path, tiny_hf_dir):
    """A broken source folder, and the extra options the case needs."""
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, src)
    extra = {}
    if kind == "missing shard":
        state = load_file(str(src / "model.safetensors"))
        names = sorted(state)
        save_file({n: state[n] for n in names[:10]}, str(src / "model-00001-of-00002.safetensors"))
        (src / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {n: "model-0000%d-of-00002.safetensors" % (1 + (i >= 10))
                                                 for i, n in enumerate(names)}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "missing key":
        state = load_file(str(src / "model.safetensors"))
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, str(src / "model.safetensors"))
    elif kind == "unknown key":
        state = load_file(str(src / "model.safetensors"))
        state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # tolerated: derived buffer
        save_file(state, str(src / "model.safetensors"))
    elif kind == "shape mismatch":
        config = json.loads((src / "config.json").read_text())
        config["intermediate_size"] = 512
        (src / "config.json").write_text(json.dumps(config))
    elif kind == "tp does not divide groups":
        extra = {"tp": 3}
    elif kind == "unpicklable bin":
        (src / "model.safetensors").unlink()
        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump({"x": NotWeights()}, f)
    elif kind == "no config":
        (src / "config.json").unlink()
    return src, extra


@pytest.mark.parametrize("kind,message", [
    ("missing shard", "shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing"),
    ("missing key", "tensor(s) the config implies are missing, e.g. model.layers.1.mlp.up_proj.weight"),
    ("unknown key", "unexpected tensor model.layers.0.mlp.extra_proj.weight (1 in all)"),
    ("shape mismatch", "model.layers.0.mlp.gate_proj.weight has shape (256, 128), the config implies (512, 128)"),
    ("tp does not divide groups", "tensor-parallel size 3 must divide both the 8 attention heads and the 4 query"),
    ("unpicklable bin", "cannot be read as plain weights"),
    ("no config", "no Hugging Face config at"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_hf_dir, kind, message):
    src, extra = _break(kind, tmp_path, tiny_hf_dir)
    save = tmp_path / "out"
    args = ["-m", "aquila_npu.convert", "--load-dir", str(src), "--save-dir", str(save), "--no-progress",
            "--target-tensor-parallel-size", str(extra.get("tp", 2))]
    result = run_python(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aquila-npu convert: error: ") and message in lines[0], lines
    assert not save.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]  # no partial folder either


def test_existing_output_needs_overwrite(tmp_path, tiny_hf_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AquilaNpuError, match="exists and is not empty"):
        run_convert(tiny_hf_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    run_convert(tiny_hf_dir, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_a_failure_midway_removes_the_partial_output(tmp_path, tiny_hf_dir, monkeypatch):
    from aquila_npu.convert import hf_format

    original = hf_format.HFCheckpoint.tensor

    def fail_late(self, name):
        if name == "model.layers.1.mlp.up_proj.weight":
            raise AquilaNpuError("disk read failed")
        return original(self, name)

    monkeypatch.setattr(hf_format.HFCheckpoint, "tensor", fail_late)
    with pytest.raises(AquilaNpuError, match="disk read failed"):
        run_convert(tiny_hf_dir, tmp_path / "out", tp=2)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------- --verify
def test_verify_passes_for_a_faithful_conversion_with_a_dtype_change(tmp_path, tiny_hf_dir):
    result = run_convert(tiny_hf_dir, tmp_path / "mg", tp=2, pp=2, verify=True, params_dtype="bf16")
    assert result.max_logit_diff is not None and result.max_logit_diff <= 1e-4


def test_verify_catches_a_wrong_layout_and_keeps_nothing(tmp_path, tiny_hf_dir, monkeypatch):
    from aquila_npu.convert import megatron_format

    original = megatron_format.iter_hf_to_megatron

    def scaled_norms(*args, **kwargs):  # a layout bug that keeps every shape
        for key, tensor in original(*args, **kwargs):
            yield key, tensor * 2 if key.endswith("input_layernorm.weight") else tensor

    monkeypatch.setattr(megatron_format, "iter_hf_to_megatron", scaled_norms)
    with pytest.raises(AquilaNpuError, match="verification failed"):
        run_convert(tiny_hf_dir, tmp_path / "mg", tp=2, verify=True)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------- ModelLink's legacy layout
LEGACY_NAMES = {  # megatron-core -> ModelLink (legacy Megatron) key names, from ModelLink's Aquila2 converter
    "embedding.word_embeddings.weight": "language_model.embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight": "language_model.encoder.final_norm.weight",
    "output_layer.weight": "language_model.output_layer.weight",
    "input_layernorm.weight": "input_norm.weight",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "pre_mlp_layernorm.weight": "post_attention_norm.weight",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
}


def _to_legacy(key: str) -> str:
    if key in LEGACY_NAMES:
        return LEGACY_NAMES[key]
    _, _, index, rest = key.split(".", 3)
    return f"language_model.encoder.layers.{index}.{LEGACY_NAMES[rest]}"


@pytest.mark.parametrize("nested", [False, True])
def test_reads_modellink_legacy_checkpoints(tmp_path, shaped_34b, nested):
    run_convert(shaped_34b, tmp_path / "mg", tp=2, pp=2)
    for file in (tmp_path / "mg").glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(file, weights_only=False)
        flat = {_to_legacy(k): v for k, v in state["model"].items()}
        if nested:
            tree: dict = {}
            for key, value in flat.items():
                node = tree
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
            flat = tree
        state["model"] = flat
        torch.save(state, file)
    run_convert(tmp_path / "mg", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(shaped_34b), hf_state(tmp_path / "hf"))


# ----------------------------------------------------------------------------------- torch_dist
@pytest.mark.parametrize("shape", ["7b", "34b"])
def test_torch_dist_round_trip_is_bit_exact(tmp_path, shape, shaped_7b, shaped_34b):
    source = shaped_7b if shape == "7b" else shaped_34b
    run_convert(source, tmp_path / "dist", ckpt_format="torch_dist")
    assert (tmp_path / "dist" / "iter_0000001" / "metadata.json").is_file()
    run_convert(tmp_path / "dist", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(source), hf_state(tmp_path / "hf"))


def test_between_megatron_formats(tmp_path, shaped_34b):
    """torch TP2/PP2 -> torch_dist -> torch TP4/PP1 -> HF equals the original."""
    run_convert(shaped_34b, tmp_path / "a", tp=2, pp=2)
    run_convert(tmp_path / "a", tmp_path / "b", load_type="mg", save_type="mg", ckpt_format="torch_dist")
    run_convert(tmp_path / "b", tmp_path / "c", load_type="mg", save_type="mg", tp=4)
    run_convert(tmp_path / "c", tmp_path / "hf", load_type="mg", save_type="hf")
    assert_bit_identical(hf_state(shaped_34b), hf_state(tmp_path / "hf"))
