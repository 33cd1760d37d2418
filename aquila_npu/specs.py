"""Model specs: one dataclass per model size, turned into megatron-core configs and Megatron-LM flags.

A ``ModelSpec`` holds the architecture of a Llama-style decoder (RMSNorm, SwiGLU, rotate-half RoPE, optional GQA).
A ``ModelFamily`` groups the named specs one plugin declares with its tokenizer defaults and the Hugging Face
architectures it recognises, so a spec can be derived from a ``config.json`` without running remote code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from aquila_npu.chat import ChatTemplate
from aquila_npu.errors import AquilaNpuError

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ModelSpec:
    """The architecture of one model. Field names follow Megatron's ``TransformerConfig`` where one exists."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int
    max_position_embeddings: int
    vocab_size: int
    rotary_base: float = 10000.0
    # linear RoPE scaling (HF ``rope_scaling: {type: linear, factor}``): positions are divided by this factor, so
    # a model trained on N positions reads factor x N (megatron-core's ``seq_len_interpolation_factor``)
    rotary_seq_len_interpolation_factor: float | None = None
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.01
    # Megatron pads the vocabulary to a multiple of this times the tensor-parallel size.
    make_vocab_size_divisible_by: int = 1
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    # the dtype the published checkpoint is stored in (and the seed trains in)
    params_dtype: str = "fp32"
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "seq_length", "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AquilaNpuError(f"model spec {self.name!r}: {name} must be a positive integer, got {value!r}")
        factor = self.rotary_seq_len_interpolation_factor
        if factor is not None and not is_scaling_factor(factor):
            raise AquilaNpuError(f"model spec {self.name!r}: rotary_seq_len_interpolation_factor must be a number "
                                 f">= 1 (the linear RoPE scaling factor), got {factor!r}")
        if self.hidden_size % self.num_attention_heads:
            raise AquilaNpuError(
                f"model spec {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise AquilaNpuError(
                f"model spec {self.name!r}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}")
        if self.params_dtype not in _DTYPES:
            raise AquilaNpuError(
                f"model spec {self.name!r}: params_dtype must be one of {', '.join(_DTYPES)}, got {self.params_dtype!r}")

    @property
    def kv_channels(self) -> int:
        """Head dimension (Aquila2 has no separate ``kv_channels``: hidden / heads = 128 for every size)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def group_query_attention(self) -> bool:
        return self.num_query_groups != self.num_attention_heads

    def replace(self, **overrides: Any) -> ModelSpec:
        """A copy with ``overrides`` applied (an explicit architecture flag always wins over the spec)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise AquilaNpuError(f"unknown model spec field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary size after Megatron's padding (``_vocab_size_with_padding`` in Megatron-LM)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
        """Raise a one-line error when the model cannot be split this way."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise AquilaNpuError(
                f"{self.name}: tensor-parallel size {tp} must divide both the {self.num_attention_heads} attention "
                f"heads and the {self.num_query_groups} query groups; choose a divisor of {self.num_query_groups}")
        if self.ffn_hidden_size % tp:
            raise AquilaNpuError(
                f"{self.name}: tensor-parallel size {tp} must divide ffn_hidden_size {self.ffn_hidden_size}")
        if self.num_layers % pp:
            raise AquilaNpuError(
                f"{self.name}: pipeline-parallel size {pp} must divide the {self.num_layers} layers")

    def transformer_config(self, **overrides: Any):
        """The megatron-core ``TransformerConfig`` for this spec.

        ``overrides`` are ``TransformerConfig`` fields (parallel sizes, dtype, sequence_parallel, ...). Fusions
        that need CUDA extensions are off here; device plugins turn kernels on through the layer spec instead.
        """
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig

        dtype = getattr(torch, _DTYPES[self.params_dtype])
        values: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=self.add_bias_linear,
            init_method_std=self.init_method_std,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            attention_softmax_in_fp32=True,
            apply_query_key_layer_scaling=False,
            # fused CUDA paths off: kernels come through the layer spec's seams (aquila_npu.layers)
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            params_dtype=dtype,
            bf16=dtype is torch.bfloat16,
            fp16=dtype is torch.float16,
        )
        values.update(overrides)
        config = TransformerConfig(**values)
        self.check_parallel(config.tensor_model_parallel_size, config.pipeline_model_parallel_size)
        return config

    def megatron_lm_flags(self) -> dict[str, str | None]:
        """The Megatron-LM command-line flags that describe this architecture (``None`` marks a switch)."""
        flags: dict[str, str | None] = {
            "--num-layers": str(self.num_layers),
            "--hidden-size": str(self.hidden_size),
            "--ffn-hidden-size": str(self.ffn_hidden_size),
            "--num-attention-heads": str(self.num_attention_heads),
            "--seq-length": str(self.seq_length),
            "--max-position-embeddings": str(self.max_position_embeddings),
            # the inference scripts' KV cache and prompt limit: the positions the model has (Megatron-LM: 2560)
            "--inference-max-seq-length": str(self.max_position_embeddings),
            "--position-embedding-type": "rope",
            "--rotary-base": _number(self.rotary_base),
            **self._interpolation_flag(),
            "--normalization": "RMSNorm",
            "--norm-epsilon": _number(self.norm_epsilon),
            "--swiglu": None,
            "--make-vocab-size-divisible-by": str(self.make_vocab_size_divisible_by),
            "--init-method-std": _number(self.init_method_std),
            "--attention-softmax-in-fp32": None,
            # the spec's TransformerConfig has no dropout (Aquila2 trains without); Megatron-LM defaults to 0.1
            "--attention-dropout": "0.0",
            "--hidden-dropout": "0.0",
        }
        if self.group_query_attention:
            flags["--group-query-attention"] = None
            flags["--num-query-groups"] = str(self.num_query_groups)
        if self.untie_embeddings_and_output_weights:
            flags["--untie-embeddings-and-output-weights"] = None
        if not self.add_bias_linear:
            flags["--disable-bias-linear"] = None
        return flags


    def _interpolation_flag(self) -> dict[str, str]:
        factor = self.rotary_seq_len_interpolation_factor
        if factor is None:
            return {}
        if not float(factor).is_integer():  # Megatron-LM's flag is an int
            raise AquilaNpuError(f"{self.name}: Megatron-LM's --rotary-seq-len-interpolation-factor takes an integer; "
                                 f"this model's linear RoPE scaling factor is {factor} (use the aquila_npu drivers)")
        return {"--rotary-seq-len-interpolation-factor": str(int(factor))}


def is_scaling_factor(value: Any) -> bool:
    """A linear RoPE scaling factor: a number (not a bool) of at least 1."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 1


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else repr(float(value))


@dataclass(frozen=True)
class TokenizerDefaults:
    """What a family's tokenizer needs that its files do not say."""

    tokenizer_type: str = "PretrainedFromHF"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # the end-of-document id appended by ``--append-eod``
    eod_token_id: int | None = None
    # the HF tokenizer adds no BOS by itself; prepend it for fine-tuning and inference
    add_bos_token: bool = False
    # folder name of the tokenizer sample in aquila_npu.sample_data (examples/data in a checkout)
    sample_dir: str | None = None


@dataclass(frozen=True)
class ModelFamily:
    """Everything one model-family plugin declares (torchtitan-style: one object per family)."""

    name: str
    specs: tuple[ModelSpec, ...]
    tokenizer: TokenizerDefaults = field(default_factory=TokenizerDefaults)
    # HF ``architectures`` / ``model_type`` values whose config.json this family can read
    hf_architectures: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    # the small spec the quickstart and smoke tests run by default
    smoke_test_model: str | None = None
    description: str = ""
    # conversation templates of the family's chat models; the first is the default
    chat_templates: tuple[ChatTemplate, ...] = ()
    # spec name -> template name, where a size's chat model uses another template than the default
    chat_template_for: Mapping[str, str] = field(default_factory=dict)

    def spec(self, name: str) -> ModelSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise AquilaNpuError(f"unknown model {name!r} in family {self.name}; known: {', '.join(self.spec_names())}")

    def spec_names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def chat_template(self, spec_name: str | None = None, template: str | None = None) -> ChatTemplate:
        """The template named ``template``, else the one for ``spec_name``, else the family's default."""
        if not self.chat_templates:
            raise AquilaNpuError(f"model family {self.name} declares no chat template")
        wanted = template or self.chat_template_for.get(spec_name or "") or self.chat_templates[0].name
        for candidate in self.chat_templates:
            if candidate.name == wanted:
                return candidate
        raise AquilaNpuError(f"unknown chat template {wanted!r} in family {self.name}; known: "
                             f"{', '.join(t.name for t in self.chat_templates)}")

    def recognises(self, hf_config: Mapping[str, Any]) -> bool:
        architectures = set(hf_config.get("architectures") or ())
        return bool(architectures & set(self.hf_architectures)) or hf_config.get("model_type") in self.hf_model_types

    def spec_from_hf_config(self, hf_config: Mapping[str, Any] | str | os.PathLike) -> ModelSpec:
        """Derive a spec from a Hugging Face config (a dict, a ``config.json`` path or a model folder).

        Reads Llama/Aquila field names only; never imports the model's own code. When the architecture equals a
        named spec the spec keeps that name, otherwise it is called ``<family>-custom``.
        """
        config = load_hf_config(hf_config) if not isinstance(hf_config, Mapping) else dict(hf_config)
        spec = spec_from_llama_config(config, name=f"{self.name}-custom")
        for known in self.specs:
            comparable = dataclasses.replace(known, name=spec.name, description="", params_dtype=spec.params_dtype,
                                             init_method_std=spec.init_method_std)
            if comparable == spec:
                return dataclasses.replace(spec, name=known.name, description=known.description)
        return spec


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` (or the one inside a model folder) as plain JSON."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AquilaNpuError(f"no Hugging Face config at {path}; pass a model folder containing config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AquilaNpuError(f"{path} is not valid JSON ({exc}); re-export config.json from the model") from None
    if not isinstance(config, dict):
        raise AquilaNpuError(f"{path} does not hold a JSON object; expected a Hugging Face config.json")
    return config


def spec_from_llama_config(config: Mapping[str, Any], name: str) -> ModelSpec:
    """Map Llama-style HF config fields (which Aquila2's ``AquilaForCausalLM`` configs share) to a ``ModelSpec``."""

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        if key in config and config[key] is not None:
            return config[key]
        if required and default is None:
            raise AquilaNpuError(f"Hugging Face config has no {key!r}; it is needed to derive the model spec")
        return default

    if get("hidden_act", "silu") != "silu":
        raise AquilaNpuError(f"unsupported hidden_act {config['hidden_act']!r}: only SwiGLU (silu) models are supported")
    rope_parameters = config.get("rope_parameters") or {}
    # BAAI's configs (and transformers 4) say rope_scaling; transformers 5 writes rope_parameters
    scaling = config.get("rope_scaling") or rope_parameters
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    factor = None
    if rope_type == "linear":
        factor = scaling.get("factor")
        if not is_scaling_factor(factor):
            raise AquilaNpuError(f"linear RoPE scaling needs a numeric factor >= 1 in the config's rope_scaling, "
                                 f"got {factor!r}")
        factor = float(factor)
    elif rope_type != "default":
        raise AquilaNpuError(f"unsupported RoPE scaling {rope_type!r}: only plain rotary embeddings and linear "
                             f"scaling (the Aquila2 16K models) are supported")
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise AquilaNpuError(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}: not an Aquila2/Llama layout")
    max_pos = get("max_position_embeddings")
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
        str(config.get("torch_dtype") or config.get("dtype") or "float32"), "fp32")
    return ModelSpec(
        name=name,
        num_layers=get("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=get("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=get("num_key_value_heads", heads),
        seq_length=max_pos,
        max_position_embeddings=max_pos,
        vocab_size=get("vocab_size"),
        rotary_base=float(rope_parameters.get("rope_theta") or get("rope_theta", 10000.0)),
        rotary_seq_len_interpolation_factor=factor,
        norm_epsilon=float(get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not get("tie_word_embeddings", False, required=False),
        add_bias_linear=bool(get("attention_bias", False, required=False) or get("mlp_bias", False, required=False)),
        params_dtype=dtype,
    )
