"""Megatron's distributed ``torch_dist`` checkpoint format (megatron-core ``dist_checkpointing``).

A ``torch_dist`` checkpoint stores each tensor once, globally (the tensor-parallel-size-1 layout, the layers of the
decoder stacked on a leading axis), so megatron-core loads it at any tensor/pipeline split. It is written here in
one process through megatron-core's own ``dist_checkpointing.save`` of a ``GPTModel``'s sharded state dict (built
on the meta device, so no second copy of the weights exists) and read back through ``dist_checkpointing.load``.
Unlike the per-rank format, both directions hold the whole model in memory once (the distributed saver takes the
whole state dict in one call, and its loader reads a stored tensor only whole).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from aquila_npu.convert.megatron_format import (CHECKPOINT_VERSION, TRACKER, LayerCachedSource, Parallelism,
                                                iteration_dir, megatron_args, read_tracker, spec_from_args)
from aquila_npu.errors import USER_ERRORS, AquilaNpuError, first_line, write_failure_message
from aquila_npu.specs import ModelSpec
from aquila_npu.weights import MC_LAYER, hf_to_megatron, megatron_to_hf_layer

# megatron-core's local layer spec saves its norms under Transformer Engine's names (sharded_state_dict_keys_map)
_LAYER_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
}


@contextlib.contextmanager
def _reading(root: str):
    """Reads of the ``torch_dist`` folder ``root``: only data is unpickled (``aquila_npu.unpickling``), and a file
    that cannot be read is one ``AquilaNpuError`` naming the folder, not torch's per-rank exception report."""
    from aquila_npu import unpickling

    unpickling.install()
    try:
        yield
    except (*USER_ERRORS, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch.distributed.checkpoint's CheckpointException is one
        cause = first_failure(exc)
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        detail = first_line(cause).split(". ")[0]
        raise AquilaNpuError(f"{root}: the torch_dist checkpoint cannot be loaded ({type(cause).__name__}: {detail}); "
                             f"is it complete (a truncated .distcp file?) and made for this model?") from None


def first_failure(exc: BaseException) -> BaseException:
    """Our own error behind ``exc`` if there is one (inside torch.distributed.checkpoint's per-rank
    ``CheckpointException`` or an exception's cause), else the first rank's failure, else ``exc`` itself."""
    found, seen, current = exc, set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict) and failures:
            wrapped = next(iter(failures.values()))  # (exception, stack summary)
            current = found = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            continue
        current = current.__cause__ or current.__context__
    return found


def load_common(root: str) -> dict:
    """The common (non-sharded) state of the ``torch_dist`` folder ``root``, weights-only."""
    from megatron.core import dist_checkpointing

    with _reading(root):
        return dist_checkpointing.load_common_state_dict(root)


def load_tensors_metadata(root: str) -> dict:
    """{key: ShardedTensor without data} of every tensor stored in the ``torch_dist`` folder ``root``."""
    from megatron.core import dist_checkpointing

    with _reading(root):
        return dist_checkpointing.load_tensors_metadata(root)


def load(sharded_state_dict: dict, root: str) -> dict:
    """megatron-core's ``dist_checkpointing.load`` of ``root``, reading data only (call inside a megatron world)."""
    from megatron.core import dist_checkpointing

    with _reading(root):
        return dist_checkpointing.load(sharded_state_dict, root)


class _WorkerErrorEcho(logging.Filter):
    """megatron-core's checkpoint writer logs a failed write before raising it; ``save`` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Local process")


_WRITER_LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"


def save(sharded_state_dict: dict, root: str, where: str) -> None:
    """megatron-core's ``dist_checkpointing.save`` into ``root``; a failed write (a full disk, a read-only folder)
    is one ``AquilaNpuError`` naming ``where`` (the flag and folder the user gave)."""
    from megatron.core import dist_checkpointing

    logger = logging.getLogger(_WRITER_LOGGER)
    if not any(isinstance(f, _WorkerErrorEcho) for f in logger.filters):
        logger.addFilter(_WorkerErrorEcho())
    try:
        dist_checkpointing.save(sharded_state_dict, root)
    except (*USER_ERRORS, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the writer's workers report failures as RuntimeError
        if getattr(exc, "failures", None) == {}:  # this rank wrote its part; another one could not
            raise OtherRankFailed(f"{where}: another rank could not write its part of the checkpoint") from None
        raise AquilaNpuError(write_failure_message(first_failure(exc), where)) from None


class OtherRankFailed(AquilaNpuError):
    """A collective write failed on another rank; that rank reports why."""


def is_dist_checkpoint(path: str) -> bool:
    try:
        iteration = read_tracker(path)
    except AquilaNpuError:
        return False
    return os.path.isfile(os.path.join(path, iteration_dir(iteration), "metadata.json"))


def write_megatron_dist(source, spec: ModelSpec, path: str, dtype: torch.dtype | None, iteration: int = 1,
                        progress=None, where: str | None = None) -> None:
    """Write ``source`` (``tensor(hf_name)``) as a ``torch_dist`` checkpoint (call inside a megatron world);
    ``where`` names the output in errors (default: ``path``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from aquila_npu.model import build_gpt_model

    state = hf_to_megatron(LayerCachedSource(source, dtype, progress), spec)
    saved_dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = build_gpt_model(spec, params_dtype=saved_dtype, perform_initialization=False,
                                use_cpu_initialization=True)
    sharded = model.sharded_state_dict()
    for key, item in sharded.items():
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            if key not in state:
                raise AquilaNpuError(f"megatron-core expects {key}, which the weight mapping does not produce")
            item.data = state[key]
    root = os.path.join(path, iteration_dir(iteration))
    os.makedirs(root, exist_ok=True)
    where = where or path
    save({"model": sharded, "args": megatron_args(spec, Parallelism(), saved_dtype),
          "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}, root, where)
    with open(os.path.join(path, TRACKER), "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")


class MegatronDistCheckpoint:
    """A ``torch_dist`` checkpoint, read one layer at a time with HF tensor names on the outside (call inside a
    megatron world: reading uses torch.distributed)."""

    def __init__(self, path: str, spec: ModelSpec | None = None, as_pieces: bool = False) -> None:
        self.path = path
        self.iteration = read_tracker(path)
        self.root = os.path.join(path, iteration_dir(self.iteration))
        common = load_common(self.root)
        self.spec = spec or spec_from_args(common.get("args"), path)
        self.metadata = load_tensors_metadata(self.root)
        self._layer_cache: tuple[int, dict] | None = None
        self._stacked: dict[str, torch.Tensor] | None = None

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Whole (global) tensors. The distributed loader reads a stored tensor only as a whole in one process,
        so the decoder's stacked tensors are read together once (memory: the model, not a layer)."""
        import torch.distributed as dist
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        # every rank of a larger world reads the whole tensor too: one main replica, the others copies of it
        replica = dist.get_rank() if dist.is_initialized() else 0
        request = {}
        for key in keys:
            if key not in self.metadata:
                raise AquilaNpuError(f"{self.path}: tensor {key} missing; not a megatron-core GPT checkpoint")
            meta = self.metadata[key]
            request[key] = ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype),
                                                           replica_id=replica)
        return load(request, self.root)

    def tensor(self, name: str) -> torch.Tensor:
        spec = self.spec
        if name == "model.embed_tokens.weight":
            return self._load(["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"][
                :spec.vocab_size]
        if name == "lm_head.weight":
            return self._load(["output_layer.weight"])["output_layer.weight"][:spec.vocab_size]
        if name == "model.norm.weight":
            return self._load(["decoder.final_layernorm.weight"])["decoder.final_layernorm.weight"]
        layer = int(name.split(".")[2])
        if self._stacked is None:
            self._stacked = self._load(["decoder.layers." + stored for stored in _LAYER_KEYS.values()])
        if self._layer_cache is None or self._layer_cache[0] != layer:
            prefix = MC_LAYER.format(i=0)
            state = {prefix + ours: self._stacked["decoder.layers." + stored][layer]
                     for ours, stored in _LAYER_KEYS.items()}
            self._layer_cache = (layer, megatron_to_hf_layer([state], prefix, spec, layer))
        return self._layer_cache[1][name]
