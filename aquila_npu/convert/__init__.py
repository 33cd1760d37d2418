"""Checkpoint conversion: Hugging Face <-> Megatron at any tensor/pipeline split, tensor by tensor.

``convert(ConvertOptions(...))`` is the library entry point; ``python -m aquila_npu.convert`` is its command line.
Every direction goes through one pair of interfaces: a *source* that returns full tensors under Hugging Face names
(``HFCheckpoint``, ``MegatronCheckpoint``) and a *writer* for the target format. Output is written to a temporary
folder beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from aquila_npu.errors import AquilaNpuError, reported_os_errors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ConvertOptions:
    load_dir: str
    save_dir: str
    load_model_type: str = "hf"  # hf | mg
    save_model_type: str = "mg"  # hf | mg
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    params_dtype: str | None = None  # fp32 | fp16 | bf16; None keeps the source dtype
    ckpt_format: str = "torch"  # torch | torch_dist
    model: str | None = None  # a named spec; otherwise derived from config.json / the saved args
    tokenizer_model: str | None = None  # copied next to an HF output
    max_shard_bytes: int = 5 * 2**30
    overwrite: bool = False
    progress: bool = True
    verify: bool = False  # compare source and output logits before the output is renamed into place
    lora_load: str | None = None  # a LoRA run's adapters: merged into the output, or (save_model_type peft) alone


@dataclass
class ConvertResult:
    save_dir: str
    tensors: int
    bytes_read: int
    seconds: float
    max_logit_diff: float | None = None


def open_megatron(path: str, spec=None, as_pieces: bool = False):
    """A Megatron checkpoint of either format (per-rank ``torch`` or ``torch_dist``), read with HF names;
    ``as_pieces``: joined tensor-parallel slices may come as ``weights.Pieces`` (for the HF writer)."""
    from aquila_npu.convert.megatron_dist import MegatronDistCheckpoint, is_dist_checkpoint
    from aquila_npu.convert.megatron_format import MegatronCheckpoint

    return (MegatronDistCheckpoint if is_dist_checkpoint(path) else MegatronCheckpoint)(path, spec, as_pieces)


def _open_source(options: ConvertOptions, plugins):
    from aquila_npu.convert.hf_format import HFCheckpoint, read_spec

    if not os.path.isdir(options.load_dir):
        raise AquilaNpuError(f"--load-dir {options.load_dir} does not exist or is not a folder")
    spec = plugins.find_model(options.model)[1] if options.model else None
    if options.load_model_type == "hf":
        spec = spec or read_spec(options.load_dir, plugins)
        return HFCheckpoint(options.load_dir, spec), spec
    if options.load_model_type == "mg":
        source = open_megatron(options.load_dir, spec, as_pieces=options.save_model_type == "hf")
        return source, source.spec
    raise AquilaNpuError(f"--load-model-type must be hf or mg, not {options.load_model_type!r}")


def _family_tokenizer(spec, plugins):
    family = plugins.family_declaring(spec)
    return family.tokenizer if family else None


def convert(options: ConvertOptions) -> ConvertResult:
    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    if options.save_model_type not in ("hf", "mg", "peft"):
        raise AquilaNpuError(f"--save-model-type must be hf, mg or peft, not {options.save_model_type!r}")
    if options.save_model_type == "peft" and not options.lora_load:
        raise AquilaNpuError("--save-model-type peft writes LoRA adapters: add --lora-load (a LoRA run's --save "
                             "folder)")
    if options.lora_load and options.verify:
        raise AquilaNpuError("--verify compares the output with --load-dir, which lacks the --lora-load adapters; "
                             "drop --verify")
    if options.ckpt_format not in ("torch", "torch_dist"):
        raise AquilaNpuError(f"--ckpt-format must be torch or torch_dist, not {options.ckpt_format!r}")
    if options.params_dtype is not None and options.params_dtype not in DTYPES:
        raise AquilaNpuError(f"--params-dtype must be one of {', '.join(DTYPES)}, not {options.params_dtype!r}")
    target = os.path.abspath(options.save_dir)
    _check_target(options, target)
    with _megatron_world_if_needed(options):
        return _convert(options, plugins, target)


def _check_target(options: ConvertOptions, target: str) -> None:
    """The output may neither be nor contain nor sit inside the source (an --overwrite would destroy it), nor be a
    file, nor replace a folder without --overwrite."""
    source, real_target = os.path.realpath(options.load_dir), os.path.realpath(target)
    if os.path.commonpath([source, real_target]) in (source, real_target):
        raise AquilaNpuError(f"--save-dir {options.save_dir} and --load-dir {options.load_dir} are the same folder "
                             f"or one holds the other; the output would replace its own source: choose a "
                             f"--save-dir outside it")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise AquilaNpuError(f"--save-dir {options.save_dir} is a file, not a folder; choose a folder path")
    from aquila_npu.files import remove_stale_temporaries

    remove_stale_temporaries(target)  # a killed run's leftovers, or its moved-aside older output put back
    if os.path.exists(target) and os.listdir(target) and not options.overwrite:
        raise AquilaNpuError(f"--save-dir {options.save_dir} exists and is not empty; choose a new folder or "
                             f"pass --overwrite")


def _megatron_world_if_needed(options: ConvertOptions):
    """torch_dist reading and writing go through megatron-core's dist_checkpointing: a world of one."""
    import contextlib

    from aquila_npu.convert.megatron_dist import is_dist_checkpoint

    dist_in = (options.load_model_type == "mg" and is_dist_checkpoint(options.load_dir)) or bool(
        options.lora_load and is_dist_checkpoint(options.lora_load))
    dist_out = options.save_model_type == "mg" and options.ckpt_format == "torch_dist"
    if not (dist_in or dist_out):
        return contextlib.nullcontext()
    from aquila_npu import distributed

    return distributed.megatron_world()


def _convert(options: ConvertOptions, plugins, target: str) -> ConvertResult:
    from aquila_npu.convert.megatron_format import Parallelism
    from aquila_npu.convert.streaming import Prefetched
    from aquila_npu.files import replaced_folder
    from aquila_npu.weights import hf_names

    source, spec = _open_source(options, plugins)
    if options.lora_load:
        from aquila_npu.convert import lora_adapters

        adapters = lora_adapters.read_adapters(options.lora_load)
        if options.save_model_type == "peft":
            adapters.check_base(spec, f"--load-dir {options.load_dir}")
            start = time.perf_counter()
            with reported_os_errors(f"--save-dir {options.save_dir}"), replaced_folder(target) as work:
                lora_adapters.write_peft(adapters, work, os.path.abspath(options.load_dir)
                                         if options.load_model_type == "hf" else None)
            count = sum(a.numel() + b.numel() for a, b in adapters.factors.values())
            return ConvertResult(target, len(adapters.factors), count * 4, time.perf_counter() - start)
        source = lora_adapters.MergedSource(source, adapters, f"--load-dir {options.load_dir}")
    dtype = DTYPES.get(options.params_dtype) if options.params_dtype else None
    vp = 1
    if options.num_layers_per_virtual_pipeline_stage:
        per_stage = spec.num_layers // options.target_pipeline_parallel_size
        if per_stage % options.num_layers_per_virtual_pipeline_stage:
            raise AquilaNpuError(f"--num-layers-per-virtual-pipeline-stage {options.num_layers_per_virtual_pipeline_stage}"
                                 f" must divide the {per_stage} layers of each pipeline stage")
        vp = per_stage // options.num_layers_per_virtual_pipeline_stage
    parallel = Parallelism(options.target_tensor_parallel_size, options.target_pipeline_parallel_size, vp)
    if options.save_model_type == "mg":
        parallel.check(spec)

    probe_dtype = source.tensor("model.norm.weight").dtype  # checkpoints hold one dtype
    meter = _Meter(spec, options.progress)
    # every writer asks for the source's tensors in checkpoint order, except with virtual pipeline chunks
    if parallel.vp == 1:
        source = Prefetched(source, hf_names(spec))
    try:
        with reported_os_errors(f"--save-dir {options.save_dir}"), replaced_folder(target) as work:
            max_diff = _write(options, source, spec, parallel, work, dtype, probe_dtype, meter, plugins)
    finally:
        meter.close()
        if isinstance(source, Prefetched):
            source.close()
    return ConvertResult(target, meter.tensors, meter.bytes, meter.seconds, max_diff)


def _write(options: ConvertOptions, source, spec, parallel, work: str, dtype, probe_dtype, meter, plugins):
    """The target format into ``work``; the --verify logit difference (None without it)."""
    from aquila_npu.convert.hf_format import HFWriter
    from aquila_npu.convert.megatron_format import write_megatron_torch
    from aquila_npu.weights import as_tensor, hf_names

    if options.save_model_type == "mg" and options.ckpt_format == "torch_dist":
        from aquila_npu.convert.megatron_dist import write_megatron_dist

        write_megatron_dist(source, spec, work, dtype, progress=meter.add, where=f"--save-dir {options.save_dir}")
    elif options.save_model_type == "mg":
        write_megatron_torch(source, spec, parallel, work, dtype, progress=meter.add, saved_dtype=probe_dtype)
    else:
        writer = HFWriter(work, spec, dtype or probe_dtype, _family_tokenizer(spec, plugins), options.max_shard_bytes)
        try:
            for name in hf_names(spec):
                tensor = source.tensor(name)
                meter.add(tensor)
                writer.add(name, tensor if dtype in (None, tensor.dtype) else as_tensor(tensor).to(dtype))
        except BaseException:
            writer.abort()
            raise
        writer.finish(options.tokenizer_model)
    meter.close()
    if not options.verify:
        return None
    from aquila_npu.convert.verify import verify

    return verify(options.load_dir, options.load_model_type, work, options.save_model_type, spec, dtype)


class _Meter:
    """Progress: tensors read, with the read rate in GB/s."""

    def __init__(self, spec, enabled: bool) -> None:
        from aquila_npu.weights import hf_names

        self.tensors, self.bytes, self.start = 0, 0, time.perf_counter()
        self.seconds = 0.0  # reading and writing, without --verify: set when the bar closes
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(hf_names(spec)), unit="tensor", desc="convert",
                            dynamic_ncols=True)

    def add(self, tensor: torch.Tensor) -> None:
        self.tensors += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.bytes / max(self.elapsed(), 1e-9) / 1e9:.2f} GB/s", refresh=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        if not self.seconds:
            self.seconds = self.elapsed()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
