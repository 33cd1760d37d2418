"""LoRA over megatron-core's tensor-parallel linears (``--lora-r``, ``--lora-alpha``, ``--lora-dropout``,
``--lora-target-modules``: MindSpeed-LLM's flags; megatron-core's module names).

``apply_lora(model, options)`` wraps each target linear of every transformer layer in a ``LoraLinear``: the base
layer computes as before, frozen, and a low-rank update ``scaling * B(A(dropout(x)))`` (``scaling = alpha / r``, PEFT's
convention: A Kaiming-uniform, B zero, so a new adapter changes nothing) is added to its output. The factors split
the way the wrapped layer does, so TP=N computes what TP=1 computes (Megatron-Bridge's parallel adapters):

* column-parallel (``linear_qkv``, ``linear_fc1``; output split): A ``[r, in]`` whole on every rank, B ``[out/tp, r]``
  split like the weight's rows; the r-dim activation enters the tensor-parallel region (its gradient all-reduced), so
  A's gradient is whole and equal on every rank; with sequence parallelism the input is gathered first (its gradient
  split back, not summed: it is whole already).
* row-parallel (``linear_proj``, ``linear_fc2``; input split): A ``[r, in/tp]`` split like the weight's columns, its
  partial products all-reduced (reduce-scattered along the sequence with sequence parallelism), B ``[out, r]`` whole
  (its gradient all-reduced over the tensor-parallel group with sequence parallelism, as the norms' are).

A is drawn whole from a generator seeded by the run's seed and the layer's global number, then sliced, so every
parallel layout starts from the same adapters. Checkpoint keys of the base weights stay what they were
(``...linear_qkv.weight``); the adapters add ``...linear_qkv.lora_A.weight`` / ``lora_B.weight``, sharded along the
same axes in ``torch_dist`` (``linear_fc1``'s B with megatron-core's SwiGLU layout).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from aquila_npu.errors import AquilaNpuError

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
ADAPTER_KEY = ".lora_"  # in every adapter parameter's name, in no base parameter's


@dataclass(frozen=True)
class LoraOptions:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AquilaNpuError(f"--lora-r {self.rank}: the adapters' rank must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise AquilaNpuError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AquilaNpuError(f"--lora-target-modules {' '.join(self.targets)}: choose among {' '.join(TARGETS)} "
                                 f"(megatron-core's names)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


DEFAULT_ALPHA = 32.0  # MindSpeed-LLM's


def options_from_args(args, saved=None) -> LoraOptions | None:
    """The run's LoRA options (None without ``--lora-r`` or ``--lora-load``). ``saved``: the arguments saved with
    the ``--lora-load`` adapters, which fill the flags not given; a rank, scaling or target list given that differs
    from the adapters' is an error (their shapes or their update would not be the ones trained)."""
    given = {"rank": getattr(args, "lora_r", None), "alpha": getattr(args, "lora_alpha", None),
             "dropout": getattr(args, "lora_dropout", None),
             "targets": tuple(args.lora_target_modules) if getattr(args, "lora_target_modules", None) else None}
    own = {}
    if saved is not None and getattr(saved, "lora_r", None):
        own = {"rank": saved.lora_r, "alpha": saved.lora_alpha, "dropout": saved.lora_dropout,
               "targets": tuple(saved.lora_target_modules)}
        for field, flag in (("rank", "--lora-r"), ("alpha", "--lora-alpha"), ("targets", "--lora-target-modules")):
            if given[field] is not None and given[field] != own[field]:
                mine = " ".join(own[field]) if field == "targets" else f"{own[field]:g}"
                raise AquilaNpuError(f"{flag} {given[field] if field != 'targets' else ' '.join(given[field])}: the "
                                     f"--lora-load adapters were trained with {flag} {mine}; drop the flag or match it")
    if given["rank"] is None and not own:
        return None
    def pick(field, default=None):  # the flag, else the adapters' own, else the default
        return next(v for v in (given[field], own.get(field), default) if v is not None)

    return LoraOptions(pick("rank"), float(pick("alpha", DEFAULT_ALPHA)), float(pick("dropout", 0.0)),
                       pick("targets", TARGETS))


def saved_fields(options: LoraOptions) -> dict:
    """What a checkpoint records of the adapters (Megatron-style argument names)."""
    return {"lora_r": options.rank, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
            "lora_target_modules": list(options.targets)}


def add_arguments(parser) -> None:
    """The LoRA flags, for the driver and for ``pretrain_gpt.py --plugin`` alike."""
    g = parser.add_argument_group("LoRA (aquila_npu.lora; MindSpeed-LLM's flags)")
    g.add_argument("--lora-r", type=int, default=None, help="train low-rank adapters of this rank; the base is frozen")
    g.add_argument("--lora-alpha", type=float, default=None, help="the adapters' scaling is alpha / r (default 32)")
    g.add_argument("--lora-dropout", type=float, default=None, help="default 0")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="megatron-core's names of the linears to adapt (default: all of aquila_npu.lora.TARGETS, "
                        "linear_qkv linear_proj linear_fc1 linear_fc2)")
    g.add_argument("--lora-load", default=None,
                   help="a LoRA run's --save folder: its adapters (and, unless --finetune / --no-load-optim, "
                        "optimizer, scheduler and iteration) on top of the --load base; the LoRA flags not given "
                        "are the adapters' own")


def is_adapter_key(name: str) -> bool:
    return ADAPTER_KEY in name


class LoraLinear(torch.nn.Module):
    """A megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` (frozen) plus its low-rank update; returns
    ``(output, bias)`` as the wrapped layer does. The base layer's parameters are this module's own under their own
    names, so the base checkpoint keys do not change."""

    def __init__(self, base: torch.nn.Module, options: LoraOptions, seed: int, swiglu: bool = False) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import (
            ColumnParallelLinear,
            RowParallelLinear,
            set_tensor_model_parallel_attributes,
        )

        super().__init__()
        if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            raise AquilaNpuError(f"LoRA wraps megatron-core's parallel linears, not {type(base).__name__}")
        for name, parameter in base.named_parameters(recurse=False):
            parameter.requires_grad_(False)
            self.register_parameter(name, parameter)
        object.__setattr__(self, "base", base)  # not a submodule: its parameters are registered above
        self.column = isinstance(base, ColumnParallelLinear)
        self.sequence_parallel = bool(base.sequence_parallel)
        self.swiglu = swiglu
        self.scaling = options.scaling
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        weight = base.weight
        full_a = torch.empty(options.rank, base.input_size, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        if self.column:
            a = full_a
            out_features = base.output_size_per_partition
        else:
            width = base.input_size // tp
            a = full_a[:, tp_rank * width:(tp_rank + 1) * width]
            out_features = base.output_size
        self.lora_A = torch.nn.Linear(a.shape[1], options.rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = torch.nn.Linear(options.rank, out_features, bias=False, device=weight.device,
                                      dtype=weight.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        # the split factor is this rank's own (counted by every rank in the gradient norm); the other is replicated
        split, dim = (self.lora_B.weight, 0) if self.column else (self.lora_A.weight, 1)
        set_tensor_model_parallel_attributes(split, is_parallel=tp > 1, dim=dim, stride=1)
        if not self.column and self.sequence_parallel:  # each rank's B sees its share of the sequence
            setattr(self.lora_B.weight, "sequence_parallel", True)
        self.dropout = torch.nn.Dropout(options.dropout) if options.dropout else torch.nn.Identity()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "base"), name)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank update of the layer's output for input ``x``, scaled."""
        from megatron.core.tensor_parallel import mappings

        x = self.dropout(x)
        if self.column:
            if self.sequence_parallel:
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            hidden = mappings.copy_to_tensor_model_parallel_region(self.lora_A(x))
        else:
            partial = self.lora_A(x)
            hidden = (mappings.reduce_scatter_to_sequence_parallel_region(partial) if self.sequence_parallel
                      else mappings.reduce_from_tensor_model_parallel_region(partial))
        return self.lora_B(hidden) * self.scaling

    def forward(self, x, *args, **kwargs):
        output, bias = self.base(x, *args, **kwargs)
        return output + self.update(x), bias

    def get_extra_state(self):
        return self.base.get_extra_state()

    def set_extra_state(self, state) -> None:
        self.base.set_extra_state(state)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        adapters = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        axes = {"lora_B.weight": 0} if self.column else {"lora_A.weight": 1}
        sharded = make_sharded_tensors_for_checkpoint(adapters, prefix, axes, sharded_offsets)
        if self.swiglu:  # B's rows follow the weight's: [gate; up] per rank, not a plain split of [gate; up]
            key = f"{prefix}lora_B.weight"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets,
                                                        (metadata or {}).get("singleton_local_shards", False))
        state.update(sharded)
        return state

    def extra_repr(self) -> str:
        kind = "column" if self.column else "row"
        return f"{kind}-parallel {type(self.base).__name__}, r={self.lora_A.out_features}, scaling={self.scaling}"


def apply_lora(model: torch.nn.Module, options: LoraOptions, seed: int) -> list[str]:
    """Wrap ``options.targets`` of every transformer layer of ``model`` (a megatron-core GPTModel or one pipeline
    chunk of it) and freeze every other parameter; returns the wrapped modules' names."""
    wrapped = []
    for path, layer in list(model.named_modules()):
        number = getattr(layer, "layer_number", None)
        if number is None or not hasattr(layer, "mlp"):
            continue
        for target in options.targets:
            parent = getattr(layer, PARENT[target])
            base = getattr(parent, target, None)
            if base is None:
                continue
            swiglu = target == "linear_fc1" and bool(base.config.gated_linear_unit)
            layer_seed = zlib.crc32(f"{seed}:{number}:{target}".encode())
            setattr(parent, target, LoraLinear(base, options, layer_seed, swiglu))
            wrapped.append(f"{path}.{PARENT[target]}.{target}")
    if not wrapped:
        raise AquilaNpuError(f"--lora-target-modules {' '.join(options.targets)}: no such layer in the model")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))
    return wrapped

