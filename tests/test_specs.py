"""The Aquila2 spec table, checked field by field against megatron-core's TransformerConfig and transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from aquila_npu.errors import AquilaNpuError
from aquila_npu.plugins.aquila2 import FAMILY

# The table: name -> (layers, hidden, ffn, heads, kv groups, seq/max pos, vocab, rope base, norm eps)
PUBLISHED = {
    "aquila2-7b": (32, 4096, 11008, 32, 32, 2048, 100008, 10000, 1e-5),
    "aquila2-34b": (60, 6144, 24576, 48, 8, 4096, 100008, 10000, 1e-5),
    "aquila2-70b-expr": (80, 8192, 28672, 64, 8, 4096, 100008, 10000, 1e-5),
    "aquila2-tiny": (2, 128, 256, 8, 4, 256, 100008, 10000, 1e-5),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_spec_table_matches_transformer_config(name):
    layers, hidden, ffn, heads, groups, seq, vocab, rope, eps = PUBLISHED[name]
    spec = FAMILY.spec(name)
    config = spec.transformer_config()
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (layers, hidden, ffn)
    assert (config.num_attention_heads, config.num_query_groups) == (heads, groups)
    assert config.kv_channels == hidden // heads
    assert config.layernorm_epsilon == eps
    assert config.normalization == "RMSNorm"
    assert config.gated_linear_unit and config.activation_func is F.silu  # SwiGLU
    assert config.add_bias_linear is False and config.add_qkv_bias is False
    assert (spec.seq_length, spec.max_position_embeddings, spec.vocab_size) == (seq, seq, vocab)
    assert spec.rotary_base == rope
    assert spec.untie_embeddings_and_output_weights
    flags = spec.megatron_lm_flags()
    assert flags["--num-layers"] == str(layers) and flags["--rotary-base"] == str(rope)
    assert ("--group-query-attention" in flags) == (groups != heads)
    assert "--untie-embeddings-and-output-weights" in flags and "--disable-bias-linear" in flags


@pytest.mark.parametrize("name", ["aquila2-7b", "aquila2-34b", "aquila2-70b-expr"])
def test_parameter_count_equals_transformers(name, megatron_world):
    """Built on the meta device: megatron-core's GPTModel from our spec has exactly the parameter count of the
    transformers Llama model with the same config (an independent implementation of the architecture)."""
    from megatron.core.models.gpt import GPTModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from aquila_npu import layers, weights
    from aquila_npu.kernels.seams import choose

    spec = FAMILY.spec(name)
    config = spec.transformer_config(use_cpu_initialization=True, perform_initialization=False,
                                     params_dtype=torch.float32, fp16=False, bf16=False)
    with torch.device("meta"):
        ours = GPTModel(config=config, transformer_layer_spec=layers.layer_spec(choose("cpu", None)),
                        vocab_size=spec.padded_vocab_size(1), max_sequence_length=spec.max_position_embeddings,
                        share_embeddings_and_output_weights=False, position_embedding_type="rope",
                        rotary_base=int(spec.rotary_base))
        theirs = LlamaForCausalLM(LlamaConfig(**weights.llama_config_dict(spec)))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ours) == count(theirs)


def test_rotary_base_reaches_the_model(tiny_spec, megatron_world):
    from megatron.core.models.gpt import GPTModel

    from aquila_npu import layers
    from aquila_npu.kernels.seams import choose

    spec = tiny_spec.replace(rotary_base=20000.0)
    model = GPTModel(config=spec.transformer_config(use_cpu_initialization=True),
                     transformer_layer_spec=layers.layer_spec(choose("cpu", None)), vocab_size=spec.vocab_size,
                     max_sequence_length=spec.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=int(spec.rotary_base), share_embeddings_and_output_weights=False)
    d = spec.kv_channels
    expected = 1.0 / (20000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.float(), expected)


@pytest.mark.parametrize("tp,expected", [(1, 100008), (2, 100008), (4, 100008), (8, 100008), (16, 100016)])
def test_vocab_padded_to_multiple_of_tp(tp, expected):
    assert FAMILY.spec("aquila2-7b").padded_vocab_size(tp) == expected


def test_explicit_fields_override_the_spec():
    spec = FAMILY.spec("aquila2-7b").replace(num_layers=4, seq_length=512)
    assert (spec.num_layers, spec.seq_length, spec.hidden_size) == (4, 512, 4096)
    assert spec.transformer_config().num_layers == 4
    with pytest.raises(AquilaNpuError, match="unknown model spec field"):
        spec.replace(num_layer=4)


def test_tensor_parallel_size_must_divide_query_groups():
    with pytest.raises(AquilaNpuError, match="tensor-parallel size 16 must divide"):
        FAMILY.spec("aquila2-34b").transformer_config(tensor_model_parallel_size=16)


# ----------------------------------------------------------------------------------- from Hugging Face config.json
AQUILA2_7B_CONFIG = {  # BAAI/Aquila2-7B (2023 release): custom code in auto_map, never executed
    "architectures": ["AquilaForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_aquila.AquilaConfig",
                 "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"},
    "model_type": "aquila", "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-05,
    "vocab_size": 100008, "bos_token_id": 100006, "eos_token_id": 100007, "pad_token_id": 0,
    "tie_word_embeddings": False, "torch_dtype": "float16", "initializer_range": 0.02, "use_cache": True,
}
AQUILA2_34B_CONFIG = {**AQUILA2_7B_CONFIG, "hidden_size": 6144, "intermediate_size": 24576, "num_attention_heads": 48,
                      "num_key_value_heads": 8, "num_hidden_layers": 60, "max_position_embeddings": 4096,
                      "torch_dtype": "bfloat16"}
AQUILA2_70B_CONFIG = {**AQUILA2_34B_CONFIG, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_attention_heads": 64, "num_hidden_layers": 80}
# the June 2024 re-upload of Aquila2-7B: another tokenizer, 8K context, rope_theta 1e6 -- not the 2023 model
AQUILA2_7B_2024 = {**AQUILA2_7B_CONFIG, "vocab_size": 143973, "max_position_embeddings": 8192, "rope_theta": 1e6}


@pytest.mark.parametrize("config,name", [(AQUILA2_7B_CONFIG, "aquila2-7b"), (AQUILA2_34B_CONFIG, "aquila2-34b"),
                                         (AQUILA2_70B_CONFIG, "aquila2-70b-expr")])
def test_spec_from_published_hf_config(tmp_path, config, name):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = FAMILY.spec_from_hf_config(tmp_path)
    assert spec.name == name
    known = FAMILY.spec(name)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "seq_length", "vocab_size", "rotary_base", "norm_epsilon"):
        assert getattr(spec, field) == getattr(known, field), field
    assert spec.params_dtype == known.params_dtype


def test_2024_reupload_is_not_taken_for_the_2023_model():
    spec = FAMILY.spec_from_hf_config(AQUILA2_7B_2024)
    assert spec.name == "aquila2-custom"
    assert (spec.vocab_size, spec.max_position_embeddings, spec.rotary_base) == (143973, 8192, 1e6)


def test_hf_config_round_trips_through_llama_config(tiny_spec):
    from aquila_npu.weights import llama_config_dict

    assert FAMILY.spec_from_hf_config(llama_config_dict(tiny_spec)) == tiny_spec


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported RoPE scaling .dynamic."),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
    ({"num_attention_heads": None}, "has no 'num_attention_heads'"),
])
def test_unsupported_hf_configs_fail_clearly(change, message):
    with pytest.raises(AquilaNpuError, match=message):
        FAMILY.spec_from_hf_config({**AQUILA2_7B_CONFIG, **change})


def test_missing_or_broken_config_json(tmp_path):
    with pytest.raises(AquilaNpuError, match="no Hugging Face config"):
        FAMILY.spec_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AquilaNpuError, match="not valid JSON"):
        FAMILY.spec_from_hf_config(tmp_path)
