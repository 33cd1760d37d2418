"""What generation and evaluation share: this rank's model loaded from any checkpoint, and the tokenizer.

``open_model(ModelOptions(...))`` resolves the spec, checks the tokenizer and the tensor-parallel size, brings up
the megatron world and loads this rank's weights; ``add_model_arguments`` gives a command line its flags.

``load_model`` builds the megatron-core ``GPTModel`` for this tensor-parallel rank and fills it from
* a ``torch_dist`` checkpoint (converted or trained): megatron-core's ``dist_checkpointing.load`` of the model's
  sharded state dict, which reshards to any tensor-parallel size;
* a per-rank ``torch`` checkpoint of any split, or a Hugging Face folder (converted in memory): read with HF names
  through the converter's readers and split for this rank with ``aquila_npu.weights``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from aquila_npu import device_options, plugin_manager
from aquila_npu.errors import AquilaNpuError
from aquila_npu.kernels import seams as kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: object
    dtype: torch.dtype
    source: str  # "hf" | "torch" | "torch_dist"


@dataclass
class ModelOptions:
    load: str
    tokenizer_name_or_path: str
    load_model_type: str = "mg"  # mg (Megatron, either format) | hf (converted in memory)
    model: str | None = None  # a named spec; otherwise from config.json / the checkpoint's saved arguments
    plugins: tuple[str, ...] = ()  # model-family plugins to look the spec up in (default: all)
    device: str | None = None
    tensor_model_parallel_size: int = 1
    params_dtype: str | None = None  # fp32 | fp16 | bf16; default: the checkpoint's
    kernels: dict | None = None  # kernel flags {op: True/False/None} (aquila_npu.kernels); default: the device's
    device_options: dict | None = None  # the device runtime's options given, {flag: value} (aquila_npu.device_options)
    lora_load: str | None = None  # a LoRA run's adapters, merged into the weights as they load


@dataclass
class OpenModel:
    """A model ready for inference on this rank, with what callers need beside it."""

    model: torch.nn.Module
    spec: object
    family: object  # the ModelFamily declaring the spec, or None
    tokenizer: "InferenceTokenizer"
    dtype: torch.dtype
    world: object


def open_model(options: ModelOptions, purpose: str = "inference") -> OpenModel:
    """Spec, tokenizer (checked against the model's vocabulary), megatron world and this rank's weights. One model
    spans all processes (tensor parallelism only): the world size must equal the tensor-parallel size."""
    from aquila_npu import distributed

    plugins = plugin_manager.get()
    if options.plugins:
        plugins.require(options.plugins)
    spec, source = resolve_spec(options.load, options.load_model_type, options.model, plugins,
                                options.plugins or None)
    tp = options.tensor_model_parallel_size
    spec.check_parallel(tp)
    family = family_of(spec, plugins)
    tokenizer = InferenceTokenizer(options.tokenizer_name_or_path, family.tokenizer if family else None)
    tokenizer.check_fits(spec)
    world = distributed.initialize(options.device, tp, kernels=options.kernels, device_options=options.device_options)
    import torch.distributed as dist

    if dist.get_world_size() != tp:
        raise AquilaNpuError(f"{purpose} runs one model over all processes: start {tp} process(es) for "
                             f"--tensor-model-parallel-size {tp}, not {dist.get_world_size()}")
    loaded = load_model(options.load, options.load_model_type, spec, options.params_dtype, source, options.lora_load)
    # an inference model keeps no gradients: the linears outside the layer spec (megatron-core's own, the output
    # layer) then take their frozen-weight product rather than the gradient-accumulation function
    loaded.model.requires_grad_(False)
    plugins.prepare_inference_model(loaded.model, world.device)
    if dist.get_rank() == 0:
        fused = ", ".join(sorted(world.kernels.fused)) or "none"
        adapters = f", LoRA adapters of {options.lora_load} merged" if options.lora_load else ""
        print(f"{spec.name}, {str(loaded.dtype).removeprefix('torch.')}, on {world.device} (TP={tp}){adapters}; fused "
              f"kernels: {fused}", file=sys.stderr, flush=True)
    return OpenModel(loaded.model, spec, family, tokenizer, loaded.dtype, world)


def family_of(spec, plugins):
    """The model family that declares ``spec``; for a spec read from a checkpoint's saved arguments, the only
    installed family when there is just one."""
    family = plugins.family_declaring(spec)
    if family is None and len(plugins.families()) == 1:
        family = next(iter(plugins.families().values()))
    return family


def add_model_arguments(parser) -> None:
    """The flags that choose and place the model (shared by ``generate`` and ``evaluate``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--plugin", action="append", default=[], help="model-family plugin(s) to use (default: all)")
    g.add_argument("--model", default=None, help="a named model spec (default: from the checkpoint)")
    g.add_argument("--load", required=True, help="checkpoint folder (Megatron torch / torch_dist, or Hugging Face)")
    g.add_argument("--load-model-type", choices=["mg", "hf"], default="mg")
    g.add_argument("--lora-load", default=None, help="a LoRA run's --save folder: its adapters merged into the "
                                                     "--load base as it loads")
    g.add_argument("--tokenizer-name-or-path", required=True, help="the model's tokenizer folder")
    g.add_argument("--tokenizer-type", choices=["PretrainedFromHF"], default="PretrainedFromHF")
    g.add_argument("--tokenizer-not-use-fast", action="store_true", help="accepted for the seed's scripts; the fast "
                                                                         "tokenizer gives the same ids")
    g.add_argument("--device", default=None, help="cpu, cuda or npu (default: automatic)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, choices=[1],
                   help="tensor parallelism only")
    g.add_argument("--params-dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: the "
                                                                                "checkpoint's)")
    g.add_argument("--fp16", action="store_true", help="= --params-dtype fp16")
    g.add_argument("--bf16", action="store_true", help="= --params-dtype bf16")
    kernels.add_arguments(parser)
    device_options.add_arguments(parser, plugin_manager.get().device_options())


def model_options_from_args(args) -> dict:
    """``ModelOptions`` fields from the flags of ``add_model_arguments``."""
    return dict(load=args.load, tokenizer_name_or_path=args.tokenizer_name_or_path,
                load_model_type=args.load_model_type, model=args.model, plugins=tuple(args.plugin),
                device=args.device, tensor_model_parallel_size=args.tensor_model_parallel_size,
                params_dtype=args.params_dtype or ("fp16" if args.fp16 else "bf16" if args.bf16 else None),
                kernels=kernels.request_from_args(args),
                device_options=device_options.given(args, plugin_manager.get().device_options()),
                lora_load=args.lora_load)


def resolve_spec(load: str, load_model_type: str, model_name: str | None, plugins, plugin_names=None):
    """(spec, opened Megatron checkpoint or None) for the checkpoint at ``load``: the named spec, else the one its
    config.json / saved arguments describe (a Megatron checkpoint opened for that is handed on, not reopened)."""
    if not os.path.exists(load):
        raise AquilaNpuError(f"--load {load}: no such checkpoint folder")
    if model_name:
        return plugins.find_model(model_name, plugin_names)[1], None
    if load_model_type == "hf":
        from aquila_npu.convert.hf_format import read_spec

        return read_spec(load, plugins), None
    from aquila_npu.convert import open_megatron

    source = open_megatron(load)
    return source.spec, source


def load_model(load: str, load_model_type: str, spec, params_dtype: str | None = None, source=None,
               lora_load: str | None = None) -> LoadedModel:
    """This rank's model, in eval mode, with the checkpoint's weights (call ``distributed.initialize`` first).

    ``params_dtype`` (fp32 / fp16 / bf16) defaults to the dtype the checkpoint is stored in; ``source``: the
    Megatron checkpoint at ``load`` when the caller has opened it already; ``lora_load``: LoRA adapters whose update
    is added to the weights as they are read (inference then costs what the base costs).
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

        source = source or open_megatron(load, spec)
        kind = "torch_dist" if isinstance(source, MegatronDistCheckpoint) else "torch"
    if kind == "torch_dist":
        stored = next(iter(source.metadata.values())).dtype
    else:
        stored = source.tensor("model.norm.weight").dtype
    dtype = DTYPES[params_dtype] if params_dtype else stored
    model = build_gpt_model(spec, parallel_output=False, params_dtype=dtype).eval()
    if lora_load:  # merged by HF name: every rank reads the base whole (a torch_dist base included)
        from aquila_npu.convert.lora_adapters import MergedSource, read_adapters

        source = MergedSource(source, read_adapters(lora_load), f"--load {load}")
    if kind == "torch_dist" and not lora_load:
        from aquila_npu.convert import megatron_dist

        loaded = megatron_dist.load({"model": model.sharded_state_dict()}, source.root)
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
