"""Megatron's distributed ``torch_dist`` checkpoint format (megatron-core ``dist_checkpointing``).

A ``torch_dist`` checkpoint stores each tensor once, globally (the tensor-parallel-size-1 layout, the layers of the
decoder stacked on a leading axis), so megatron-core loads it at any tensor/pipeline split. It is written here in
one process through megatron-core's own ``dist_checkpointing.save`` of a ``GPTModel``'s sharded state dict (built
on the meta device, so no second copy of the weights exists) and read back through ``dist_checkpointing.load``.
Unlike the per-rank format, both directions hold the whole model in memory once (the distributed saver takes the
whole state dict in one call, and its loader reads a stored tensor only whole).
"""

from __future__ import annotations

import os

import torch

from aquila_npu.convert.megatron_format import (CHECKPOINT_VERSION, TRACKER, LayerCachedSource, Parallelism,
                                                iteration_dir, megatron_args, read_tracker, spec_from_args)
from aquila_npu.errors import AquilaNpuError
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


def is_dist_checkpoint(path: str) -> bool:
    try:
        iteration = read_tracker(path)
    except AquilaNpuError:
        return False
    return os.path.isfile(os.path.join(path, iteration_dir(iteration), "metadata.json"))


def write_megatron_dist(source, spec: ModelSpec, path: str, dtype: torch.dtype | None, iteration: int = 1,
                        progress=None) -> None:
    """Write ``source`` (``tensor(hf_name)``) as a ``torch_dist`` checkpoint (call inside a megatron world)."""
    from megatron.core import dist_checkpointing
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
    dist_checkpointing.save({"model": sharded, "args": megatron_args(spec, Parallelism(), saved_dtype),
                             "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}, root)
    with open(os.path.join(path, TRACKER), "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")


class MegatronDistCheckpoint:
    """A ``torch_dist`` checkpoint, read one layer at a time with HF tensor names on the outside (call inside a
    megatron world: reading uses torch.distributed)."""

    def __init__(self, path: str, spec: ModelSpec | None = None, as_pieces: bool = False) -> None:
        from megatron.core import dist_checkpointing

        self.path = path
        self.iteration = read_tracker(path)
        self.root = os.path.join(path, iteration_dir(self.iteration))
        common = dist_checkpointing.load_common_state_dict(self.root)
        self.spec = spec or spec_from_args(common.get("args"), path)
        self.metadata = dist_checkpointing.load_tensors_metadata(self.root)
        self._layer_cache: tuple[int, dict] | None = None
        self._stacked: dict[str, torch.Tensor] | None = None

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Whole (global) tensors. The distributed loader reads a stored tensor only as a whole in one process,
        so the decoder's stacked tensors are read together once (memory: the model, not a layer)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for key in keys:
            if key not in self.metadata:
                raise AquilaNpuError(f"{self.path}: tensor {key} missing; not a megatron-core GPT checkpoint")
            meta = self.metadata[key]
            request[key] = ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))
        return dist_checkpointing.load(request, self.root)

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
