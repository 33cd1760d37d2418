"""LoRA adapter checkpoints (a LoRA run's ``--save`` folder, either format, any tensor/pipeline split) read whole,
and what is made of them: the update merged into the base weights (HF names, for any writer, or in memory for
generation and evaluation) or a PEFT adapter folder for ``transformers`` + ``peft``.

The factors come back in the TP=1 megatron-core layout (``linear_qkv``'s B rows per query group, ``linear_fc1``'s B
rows ``[gate; up]``), the layout ``aquila_npu.weights`` maps to HF names; PEFT adapts q/k/v and gate/up as separate
linears, so each gets the shared A and its own rows of B (``q = W_q x + s B_q A x`` exactly).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from aquila_npu.errors import AquilaNpuError
from aquila_npu.lora import PARENT, LoraOptions, options_from_args
from aquila_npu.specs import ModelSpec
from aquila_npu.weights import HF_LAYER, MC_LAYER, as_tensor, unpack_fc1, unpack_qkv

# HF modules of each megatron-core target, in PEFT's target_modules names
HF_MODULES = {"linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "linear_proj": ("self_attn.o_proj",), "linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
              "linear_fc2": ("mlp.down_proj",)}
PEFT_PREFIX = "base_model.model."
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels")


@dataclass
class Adapters:
    """A LoRA checkpoint's options, the architecture it was trained on and its factors, ``(A, B)`` per (global
    layer, target), whole."""

    path: str
    options: LoraOptions
    spec: ModelSpec
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def check_base(self, spec: ModelSpec, where: str) -> None:
        """One line when the base model is not the architecture the adapters were trained on."""
        for field in ARCHITECTURE:
            ours, theirs = getattr(spec, field), getattr(self.spec, field)
            if ours != theirs:
                raise AquilaNpuError(f"--lora-load {self.path}: the adapters were trained on a model with "
                                     f"{field.replace('_', '-')} {theirs}, the base at {where} has {ours}; give the "
                                     f"base model they were trained on")

    def deltas(self, layer: int) -> dict[str, torch.Tensor]:
        """``scaling * B @ A`` of layer ``layer`` under the HF names of the weights it is added to (fp32)."""
        out = {}
        prefix = HF_LAYER.format(i=layer)
        for target in self.options.targets:
            a, b = self.factors[(layer, target)]
            delta = (b.double() @ a.double() * self.options.scaling).float()
            for name, part in zip(HF_MODULES[target], _split_rows(target, delta, self.spec)):
                out[f"{prefix}{name}.weight"] = part
        return out

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's key names for ``LlamaForCausalLM`` (as ``save_pretrained`` writes them)."""
        out = {}
        for (layer, target), (a, b) in sorted(self.factors.items()):
            prefix = PEFT_PREFIX + HF_LAYER.format(i=layer)
            for name, rows in zip(HF_MODULES[target], _split_rows(target, b, self.spec)):
                out[f"{prefix}{name}.lora_A.weight"] = a.clone()  # each its own storage: safetensors refuses shared
                out[f"{prefix}{name}.lora_B.weight"] = rows.contiguous()
        return out


def _split_rows(target: str, matrix: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    if target == "linear_qkv":
        return [p.materialize() for p in unpack_qkv([matrix], spec)]
    if target == "linear_fc1":
        return [p.materialize() for p in unpack_fc1([matrix])]
    return [matrix]


def read_adapters(path: str) -> Adapters:
    """The adapters of the latest checkpoint under ``path`` (``torch_dist`` is read inside a megatron world)."""
    from aquila_npu.convert import megatron_dist
    from aquila_npu.convert.megatron_format import MegatronCheckpoint, spec_from_args

    if not os.path.isdir(path):
        raise AquilaNpuError(f"--lora-load {path}: no such checkpoint folder")
    if megatron_dist.is_dist_checkpoint(path):
        source = megatron_dist.MegatronDistCheckpoint(path)
        args = megatron_dist.load_common(source.root).get("args")
    else:
        source = MegatronCheckpoint(path)
        args = source.args
    options = options_from_args(argparse.Namespace(), args)  # no flags: the checkpoint's own options
    if options is None:
        raise AquilaNpuError(f"--lora-load {path}: the checkpoint records no LoRA adapters; give a LoRA run's "
                             f"--save folder")
    spec = spec_from_args(args, path)
    names = [(target, factor) for target in options.targets for factor in ("lora_A", "lora_B")]
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    if isinstance(source, megatron_dist.MegatronDistCheckpoint):
        keys = {f"decoder.layers.{PARENT[t]}.{t}.{f}.weight": (t, f) for t, f in names}
        missing = [k for k in keys if k not in source.metadata]
        if missing:
            raise AquilaNpuError(f"--lora-load {path}: {missing[0]} missing; not an adapter checkpoint of a LoRA run")
        stacked = source._load(list(keys))
        for layer in range(spec.num_layers):
            got = {keys[k]: stacked[k][layer] for k in keys}
            for target in options.targets:
                factors[(layer, target)] = (got[(target, "lora_A")], got[(target, "lora_B")])
    else:
        for layer in range(spec.num_layers):
            stage, chunk, local = source.parallel.locate(spec, layer)
            ranks = source._models(stage, chunk)
            for target in options.targets:
                key = MC_LAYER.format(i=local) + f"{PARENT[target]}.{target}."
                try:
                    a = [r[key + "lora_A.weight"] for r in ranks]
                    b = [r[key + "lora_B.weight"] for r in ranks]
                except KeyError as exc:
                    raise AquilaNpuError(f"--lora-load {path}: {exc.args[0]} missing; not an adapter checkpoint of "
                                         f"a LoRA run with --lora-target-modules {' '.join(options.targets)}") from None
                factors[(layer, target)] = _joined(target, a, b)
    return Adapters(path, options, spec, factors)


def _joined(target: str, a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-parallel slices of one adapter -> the TP=1 layout (see ``aquila_npu.lora``: a column-parallel
    target's B is split by rows, a row-parallel target's A by columns; linear_fc1's B rows are [gate; up] per
    rank)."""
    if target in ("linear_proj", "linear_fc2"):
        return torch.cat(a, dim=1), b[0]
    if target == "linear_fc1":
        gate, up = unpack_fc1(b)
        return a[0], torch.cat([gate.materialize(), up.materialize()])
    return a[0], torch.cat(b)


class MergedSource:
    """A checkpoint reader (``tensor(hf_name)``) whose adapted weights come back with the update added, in the
    base's dtype (summed in fp32)."""

    def __init__(self, source, adapters: Adapters, where: str) -> None:
        adapters.check_base(source.spec, where)
        self.source, self.adapters = source, adapters
        self.spec = source.spec
        self._layer: tuple[int, dict] | None = None

    def tensor(self, name: str):
        base = self.source.tensor(name)
        if not name.startswith("model.layers."):
            return base
        layer = int(name.split(".")[2])
        if self._layer is None or self._layer[0] != layer:
            self._layer = (layer, self.adapters.deltas(layer))
        delta = self._layer[1].get(name)
        if delta is None:
            return base
        base = as_tensor(base)
        return (base.float() + delta).to(base.dtype)

    def __getattr__(self, name):
        return getattr(self.source, name)


def write_peft(adapters: Adapters, folder: str, base_model: str | None) -> None:
    """A PEFT LoRA adapter folder: ``adapter_config.json`` (peft's own ``LoraConfig``) and
    ``adapter_model.safetensors``."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise AquilaNpuError("--save-model-type peft: install peft (pip install 'aquila-npu[peft]')") from None
    from safetensors.torch import save_file

    options = adapters.options
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=sorted(m.rsplit(".", 1)[1] for t in options.targets for m in HF_MODULES[t]),
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    config.save_pretrained(folder)
    save_file(adapters.peft_tensors(), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
