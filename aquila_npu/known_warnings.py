"""Upstream warnings that do not concern a user of our commands, each named with why; our entry points silence
them (``silence()``). Only these, matched by message, category and emitting module: any other warning still shows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    message: str  # a regular expression matched at the start of the message
    category: type[Warning]
    module: str  # a regular expression matched against the module that warns
    why: str


KNOWN = (
    KnownWarning(r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core",
                 "megatron-core announces its local fallbacks on import; they are what aquila-npu builds with "
                 "unless a device's fused kernels replace them"),
    KnownWarning(r"Apex is not installed", UserWarning, r"megatron\.core",
                 "the same announcement, for the norm"),
    KnownWarning(r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config",
                 "megatron-core's own default value of cuda_graph_scope; aquila-npu captures no CUDA graphs"),
    KnownWarning(r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing",
                 "megatron-core's torch_dist loader calls torch.distributed.checkpoint by its older name"),
    KnownWarning(r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
                 r"torch\.distributed\.checkpoint",
                 "megatron-core's torch_dist format is built on torch's ShardedTensor, which torch deprecates"),
    KnownWarning(r"Warning: tp_group is None", DeprecationWarning, r"megatron\.core",
                 "megatron-core's own layers, built by megatron-core's own model, ask for the default group"),
)


def silence() -> None:
    """Ignore the known warnings in this process (and the processes it forks)."""
    for known in KNOWN:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
