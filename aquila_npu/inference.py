"""What generation and evaluation share: this rank's model loaded from any checkpoint, and the tokenizer.

``load_model`` builds the megatron-core ``GPTModel`` for this tensor-parallel rank and fills it from
* a ``torch_dist`` checkpoint (converted or trained): megatron-core's ``dist_checkpointing.load`` of the model's
  sharded state dict, which reshards to any tensor-parallel size;
* a per-rank ``torch`` checkpoint of any split, or a Hugging Face folder (converted in memory): read with HF names
  through the converter's readers and split for this rank with ``aquila_npu.weights``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from aquila_npu.errors import AquilaNpuError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: object
    dtype: torch.dtype
    source: str  # "hf" | "torch" | "torch_dist"


def resolve_spec(load: str, load_model_type: str, model_name: str | None, plugins, plugin_names=None):
    """The spec of the checkpoint at ``load``: the named one, else its config.json / saved arguments."""
    if not os.path.exists(load):
        raise AquilaNpuError(f"--load {load}: no such checkpoint folder")
    if model_name:
        return plugins.find_model(model_name, plugin_names)[1]
    if load_model_type == "hf":
        from aquila_npu.convert.hf_format import read_spec

        return read_spec(load, plugins)
    from aquila_npu.convert import open_megatron

    return open_megatron(load).spec


def load_model(load: str, load_model_type: str, spec, params_dtype: str | None = None) -> LoadedModel:
    """This rank's model, in eval mode, with the checkpoint's weights (call ``distributed.initialize`` first).

    ``params_dtype`` (fp32 / fp16 / bf16) defaults to the dtype the checkpoint is stored in.
    """
    from megatron.core import parallel_state

    from aquila_npu import weights
    from aquila_npu.model import build_gpt_model

    if load_model_type not in ("hf", "mg"):
        raise AquilaNpuError(f"--load-model-type must be hf or mg, not {load_model_type!r}")
    if not os.path.isdir(load):
        raise AquilaNpuError(f"--load {load}: no such checkpoint folder")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    spec.check_parallel(tp)
    if params_dtype is not None and params_dtype not in DTYPES:
        raise AquilaNpuError(f"--params-dtype must be one of {', '.join(DTYPES)}, not {params_dtype!r}")

    if load_model_type == "hf":
        from aquila_npu.convert.hf_format import HFCheckpoint

        source, kind = HFCheckpoint(load, spec), "hf"
    else:
        from aquila_npu.convert import open_megatron
        from aquila_npu.convert.megatron_dist import MegatronDistCheckpoint

        source = open_megatron(load, spec)
        kind = "torch_dist" if isinstance(source, MegatronDistCheckpoint) else "torch"
    if kind == "torch_dist":
        stored = next(iter(source.metadata.values())).dtype
    else:
        stored = source.tensor("model.norm.weight").dtype
    dtype = DTYPES[params_dtype] if params_dtype else stored
    model = build_gpt_model(spec, parallel_output=False, params_dtype=dtype).eval()
    if kind == "torch_dist":
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, source.root)
        model.load_state_dict(loaded["model"], strict=True)
    else:
        by_name = _ByName(source)
        weights.load_into(model, weights.hf_to_megatron(by_name, spec, tp, rank))
    return LoadedModel(model, spec, dtype, kind)


class _ByName:
    """A checkpoint reader as the read-only mapping of HF names ``weights.hf_to_megatron`` reads from."""

    def __init__(self, source) -> None:
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        from aquila_npu.weights import as_tensor

        return as_tensor(self.source.tensor(name))


class InferenceTokenizer:
    """The Hugging Face tokenizer with the interface megatron-core's text generation controller calls
    (``tokenize``, ``detokenize``, ``eod``, ``bos``, ``vocab_size``); no special tokens are added by itself."""

    def __init__(self, path: str, family_defaults=None) -> None:
        from aquila_npu.preprocess import load_tokenizer

        self.hf = load_tokenizer(path)
        defaults = family_defaults
        self.bos = (defaults.bos_token_id if defaults and defaults.bos_token_id is not None
                    else self.hf.bos_token_id)
        self.eod = (defaults.eos_token_id if defaults and defaults.eos_token_id is not None
                    else self.hf.eos_token_id)
        if self.eod is None:
            raise AquilaNpuError(f"--tokenizer-name-or-path {path}: the tokenizer has no end-of-sequence token")
        pad = defaults.pad_token_id if defaults and defaults.pad_token_id is not None else self.hf.pad_token_id
        self.pad = self.eod if pad is None else pad
        self.add_bos = bool(defaults and defaults.add_bos_token)
        self.vocab_size = len(self.hf)

    def tokenize(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def check_fits(self, spec) -> None:
        """A tokenizer with ids the model has no embedding for cannot be used with it."""
        if self.vocab_size > spec.vocab_size:
            raise AquilaNpuError(f"the tokenizer has {self.vocab_size} ids but the model's vocabulary has "
                                 f"{spec.vocab_size}: it is not this model's tokenizer (pass the one the "
                                 f"checkpoint was trained with to --tokenizer-name-or-path)")
