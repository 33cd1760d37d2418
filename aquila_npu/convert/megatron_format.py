"""Megatron's per-rank ``torch`` checkpoint format, read and written with megatron-core's key names.

Layout (what Megatron-LM's ``--load`` reads)::

    latest_checkpointed_iteration.txt            the iteration (or "release")
    iter_0000001/mp_rank_{tp:02d}/model_optim_rng.pt            pipeline-parallel size 1
    iter_0000001/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   pipeline-parallel size > 1
      {"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model": state}   ("model0", "model1", ...
      per virtual pipeline chunk)

ModelLink's legacy layout (``language_model.encoder.layers.N.self_attention.query_key_value.weight``, ..., flat or
nested) is read too. Layer numbers inside a file are local to its (virtual) pipeline chunk; chunk ``c`` of stage ``p`` holds the global
layers ``c * pp * L + p * L + [0, L)`` with ``L = num_layers / (pp * vp)``, as megatron-core assigns them.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from aquila_npu.errors import AquilaNpuError
from aquila_npu.specs import ModelSpec
from aquila_npu.unpickling import load_weights_only
from aquila_npu.weights import MC_LAYER, Pieces, hf_shapes, iter_hf_to_megatron, megatron_to_hf_layer

CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    vp: int = 1  # virtual pipeline chunks per stage

    def check(self, spec: ModelSpec) -> None:
        spec.check_parallel(self.tp, self.pp)
        if spec.num_layers % (self.pp * self.vp):
            raise AquilaNpuError(f"{spec.name}: {spec.num_layers} layers cannot be split into {self.pp} pipeline "
                                 f"stages x {self.vp} virtual chunks")

    def layers(self, spec: ModelSpec, stage: int, chunk: int) -> range:
        per_chunk = spec.num_layers // (self.pp * self.vp)
        start = chunk * self.pp * per_chunk + stage * per_chunk
        return range(start, start + per_chunk)

    def locate(self, spec: ModelSpec, layer: int) -> tuple[int, int, int]:
        """(stage, chunk, local index) of a global layer."""
        per_chunk = spec.num_layers // (self.pp * self.vp)
        chunk, rest = divmod(layer, self.pp * per_chunk)
        stage, local = divmod(rest, per_chunk)
        return stage, chunk, local


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iteration_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


# ------------------------------------------------------------------------------------------------ reading
class MegatronCheckpoint:
    """A per-rank ``torch`` checkpoint with HF tensor names on the outside. Each rank file's structure is read
    once; its tensors are read from disk one layer at a time (``streaming.detach_from_mmap``)."""

    def __init__(self, path: str, spec: ModelSpec | None = None, as_pieces: bool = False) -> None:
        self.path = path
        # row concatenations of tensor-parallel slices come back as weights.Pieces (for writers that store them)
        self.as_pieces = as_pieces
        self.iteration = read_tracker(path)
        self.root = os.path.join(path, iteration_dir(self.iteration))
        if not os.path.isdir(self.root):
            raise AquilaNpuError(f"{path}: {TRACKER} names iteration {self.iteration} but {self.root} is missing")
        names = sorted(n for n in os.listdir(self.root) if n.startswith("mp_rank_"))
        pattern = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
        ranks = [pattern.match(n) for n in names]
        if not names or not all(ranks):
            raise AquilaNpuError(f"{self.root}: no mp_rank_XX[_YYY] folders; not a Megatron torch checkpoint")
        tp = 1 + max(int(m.group(1)) for m in ranks)
        pp = 1 + max(int(m.group(2) or 0) for m in ranks)
        for t in range(tp):
            for p in range(pp):
                if not os.path.isfile(self._file(t, p, pp)):
                    raise AquilaNpuError(f"{self._file(t, p, pp)} is missing: the checkpoint is incomplete")
        self._cache: dict[tuple[int, int], dict] = {}
        first = self._rank(0, 0, pp)
        self.args = first.get("args")
        vp = sum(1 for k in first if re.fullmatch(r"model\d+", k)) or 1
        self.parallel = Parallelism(tp, pp, vp)
        self.spec = spec or spec_from_args(self.args, path)
        self.parallel.check(self.spec)
        self._layer_cache: tuple[int, dict] | None = None

    def _file(self, tp_rank: int, pp_rank: int, pp: int) -> str:
        return os.path.join(self.root, rank_dir(tp_rank, pp_rank, pp), "model_optim_rng.pt")

    def _rank(self, tp_rank: int, pp_rank: int, pp: int | None = None) -> dict:
        """A rank file's structure; its tensors stay on disk until read (see ``streaming.detach_from_mmap``)."""
        from aquila_npu.convert.streaming import detach_from_mmap

        key = (tp_rank, pp_rank)
        if key not in self._cache:
            path = self._file(tp_rank, pp_rank, pp or self.parallel.pp)
            self._cache[key] = detach_from_mmap(load_weights_only(path, mmap=True), path)
        return self._cache[key]

    def _model(self, tp_rank: int, stage: int, chunk: int) -> Mapping[str, torch.Tensor]:
        state = self._rank(tp_rank, stage)
        key = "model" if self.parallel.vp == 1 and "model" in state else f"model{chunk}"
        if key not in state:
            raise AquilaNpuError(f"{self._file(tp_rank, stage, self.parallel.pp)} has no {key!r} entry")
        model = state[key]
        if not getattr(model, "_aquila_npu_normalised", False):
            model = _NormalisedState(from_legacy(_flatten(model)))
            state[key] = model
        return model

    def _models(self, stage: int, chunk: int) -> list[Mapping[str, torch.Tensor]]:
        return [self._model(t, stage, chunk) for t in range(self.parallel.tp)]

    def tensor(self, name: str) -> torch.Tensor:
        spec, par = self.spec, self.parallel
        if name == "model.embed_tokens.weight":
            return _vocab(self._models(0, 0), "embedding.word_embeddings.weight", spec, self.path, self.as_pieces)
        if name == "lm_head.weight":
            return _vocab(self._models(par.pp - 1, par.vp - 1), "output_layer.weight", spec, self.path,
                          self.as_pieces)
        if name == "model.norm.weight":
            return _get(self._model(0, par.pp - 1, par.vp - 1), "decoder.final_layernorm.weight", self.path)
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if not match:
            raise AquilaNpuError(f"no tensor {name} in an Aquila2/Llama checkpoint")
        layer = int(match.group(1))
        if self._layer_cache is None or self._layer_cache[0] != layer:
            stage, chunk, local = par.locate(spec, layer)
            models = self._models(stage, chunk)
            prefix = MC_LAYER.format(i=local)
            try:
                self._layer_cache = (layer, megatron_to_hf_layer(models, prefix, spec, layer, self.as_pieces))
            except KeyError as exc:
                raise AquilaNpuError(f"{self.path}: key {exc.args[0]} missing for layer {layer}") from None
        return self._layer_cache[1][name]


class _NormalisedState(dict):
    """A rank's model state with flat megatron-core key names (marked so it is normalised once); tensors are
    read from disk when looked up."""

    _aquila_npu_normalised = True

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return value.load() if hasattr(value, "load") else value


def _flatten(state: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Legacy Megatron nests its model state (``{"language_model": {"encoder": {...}}}``); flatten to dotted keys."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ModelLink / legacy Megatron (``language_model.*``) -> megatron-core names; the tensors' layouts are the same
# (QKV packed per query group, SwiGLU gate/up per rank, row/column splits).
_LEGACY = [
    (r"language_model\.embedding\.word_embeddings\.weight", "embedding.word_embeddings.weight"),
    (r"language_model\.(?:encoder|decoder)\.(?:final_norm|final_layernorm)\.weight", "decoder.final_layernorm.weight"),
    (r"language_model\.output_layer\.weight", "output_layer.weight"),
    (r"language_model\.(?:encoder|decoder)\.layers\.(\d+)\.(?:input_norm|input_layernorm)\.weight",
     r"decoder.layers.\1.input_layernorm.weight"),
    (r"language_model\.(?:encoder|decoder)\.layers\.(\d+)\.self_attention\.query_key_value\.weight",
     r"decoder.layers.\1.self_attention.linear_qkv.weight"),
    (r"language_model\.(?:encoder|decoder)\.layers\.(\d+)\.self_attention\.dense\.weight",
     r"decoder.layers.\1.self_attention.linear_proj.weight"),
    (r"language_model\.(?:encoder|decoder)\.layers\.(\d+)\.(?:post_attention_norm|post_attention_layernorm)\.weight",
     r"decoder.layers.\1.pre_mlp_layernorm.weight"),
    (r"language_model\.(?:encoder|decoder)\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight",
     r"decoder.layers.\1.mlp.linear_fc1.weight"),
    (r"language_model\.(?:encoder|decoder)\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight",
     r"decoder.layers.\1.mlp.linear_fc2.weight"),
]
_LEGACY_COMPILED = [(re.compile(pattern + "$"), replacement) for pattern, replacement in _LEGACY]


def from_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ModelLink/legacy keys to megatron-core's; megatron-core states pass through unchanged."""
    if not any(key.startswith("language_model.") for key in state):
        return state
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _LEGACY_COMPILED:
            if pattern.match(key):
                renamed[pattern.sub(replacement, key)] = value
                break
        else:
            if not key.endswith(("_extra_state", "inv_freq")):
                raise AquilaNpuError(f"unknown key {key} in a ModelLink/legacy Megatron checkpoint")
    return renamed


def _get(state: Mapping[str, torch.Tensor], key: str, path: str) -> torch.Tensor:
    if key not in state:
        raise AquilaNpuError(f"{path}: key {key} missing; not a megatron-core GPT checkpoint")
    return state[key]


def _vocab(models, key: str, spec: ModelSpec, path: str, as_pieces: bool = False):
    """The vocabulary-parallel slices joined, without the padding rows."""
    parts = [_get(m, key, path) for m in models]
    rows = sum(p.shape[0] for p in parts)
    if rows < spec.vocab_size:
        raise AquilaNpuError(f"{path}: {key} has {rows} rows, fewer than the vocabulary {spec.vocab_size}")
    kept, left = [], spec.vocab_size
    for part in parts:
        if left > 0:
            kept.append(part[:left])
            left -= kept[-1].shape[0]
    pieces = Pieces(kept, (spec.vocab_size, parts[0].shape[1]))
    return pieces if as_pieces else pieces.materialize()


def read_tracker(path: str) -> int | str:
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        raise AquilaNpuError(f"{path}: no {TRACKER}; not a Megatron checkpoint folder")
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text == "release":
        return text
    if not text.isdigit():
        raise AquilaNpuError(f"{tracker} holds {text!r}, not an iteration number or 'release'")
    return int(text)


def spec_from_args(args, path: str) -> ModelSpec:
    """The architecture recorded in a checkpoint's saved Megatron arguments."""
    if args is None:
        raise AquilaNpuError(f"{path}: the checkpoint saved no args; pass --model NAME")
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    heads = get("num_attention_heads")
    vocab = get("vocab_size") or get("padded_vocab_size")
    if not (get("num_layers") and get("hidden_size") and heads and vocab):
        raise AquilaNpuError(f"{path}: the saved args lack the architecture; pass --model NAME")
    return ModelSpec(
        name=get("model_name") or "from-checkpoint",
        num_layers=get("num_layers"), hidden_size=get("hidden_size"), ffn_hidden_size=get("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=get("num_query_groups") if get("group_query_attention") else heads,
        seq_length=get("seq_length") or get("max_position_embeddings"),
        max_position_embeddings=get("max_position_embeddings"), vocab_size=vocab,
        rotary_base=float(get("rotary_base", 10000)), norm_epsilon=float(get("norm_epsilon", 1e-5)),
        rotary_seq_len_interpolation_factor=get("rotary_seq_len_interpolation_factor"),
        make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 1) or 1,
        untie_embeddings_and_output_weights=bool(get("untie_embeddings_and_output_weights", True)),
        add_bias_linear=bool(get("add_bias_linear", False)),
        params_dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(get("params_dtype"), "fp32"),
    )


# ------------------------------------------------------------------------------------------------ writing
def megatron_args(spec: ModelSpec, parallel: Parallelism, dtype: torch.dtype) -> argparse.Namespace:
    """The saved ``args``: what Megatron-LM's ``check_checkpoint_args`` compares, and the architecture.

    ``add_position_embedding`` is what Megatron-LM itself stores for ``--position-embedding-type rope`` (its
    default, True: the flag only matters for learned absolute embeddings); ``--load`` without ``--finetune``
    (generation, evaluation, resuming) compares it."""
    return argparse.Namespace(
        model_name=spec.name, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size, num_attention_heads=spec.num_attention_heads,
        group_query_attention=spec.group_query_attention, num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels, seq_length=spec.seq_length, max_position_embeddings=spec.max_position_embeddings,
        vocab_size=spec.vocab_size, padded_vocab_size=spec.padded_vocab_size(parallel.tp),
        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by, rotary_base=spec.rotary_base,
        rotary_seq_len_interpolation_factor=spec.rotary_seq_len_interpolation_factor,
        norm_epsilon=spec.norm_epsilon, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
        add_position_embedding=True, untie_embeddings_and_output_weights=spec.untie_embeddings_and_output_weights,
        add_bias_linear=spec.add_bias_linear, tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vp if parallel.vp > 1 else None,
        num_layers_per_virtual_pipeline_stage=(spec.num_layers // (parallel.pp * parallel.vp)
                                               if parallel.vp > 1 else None),
        params_dtype=dtype, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
        tokenizer_type=None, consumed_train_samples=0, consumed_valid_samples=0,
    )


def write_megatron_torch(source, spec: ModelSpec, parallel: Parallelism, path: str, dtype: torch.dtype | None,
                         iteration: int = 1, progress=None, saved_dtype: torch.dtype | None = None) -> None:
    """Write ``source`` (anything with ``tensor(hf_name)``) as a per-rank checkpoint at ``parallel``.

    The tensor-parallel ranks of a pipeline stage are written side by side: each source tensor is read once and
    its slices go straight into the rank files, whose layout was planned from the shapes. Memory holds one
    layer's source tensors, never a rank file or the model.
    """
    from aquila_npu.convert.streaming import TorchFileWriter, fake_like

    parallel.check(spec)
    saved_dtype = dtype or saved_dtype or source.tensor("model.norm.weight").dtype  # checkpoints hold one dtype
    shapes_only = {name: torch.empty(shape, dtype=saved_dtype, device="meta")
                   for name, shape in hf_shapes(spec).items()}
    reader = LayerCachedSource(source, dtype, progress)
    root = os.path.join(path, iteration_dir(iteration))

    def rank_states(hf, stage: int, tp_rank: int, as_pieces: bool = False):
        for chunk in range(parallel.vp):
            yield ("model" if parallel.vp == 1 else f"model{chunk}"), iter_hf_to_megatron(
                hf, spec, parallel.tp, tp_rank, layers=parallel.layers(spec, stage, chunk),
                pre_process=stage == 0 and chunk == 0,
                post_process=stage == parallel.pp - 1 and chunk == parallel.vp - 1, as_pieces=as_pieces)

    for stage in range(parallel.pp):
        writers = []
        for tp_rank in range(parallel.tp):
            template: dict = {key: fake_like((name, tuple(t.shape), t.dtype) for name, t in states)
                              for key, states in rank_states(shapes_only, stage, tp_rank)}
            template.update(args=megatron_args(spec, parallel, saved_dtype), checkpoint_version=CHECKPOINT_VERSION,
                            iteration=iteration)
            folder = os.path.join(root, rank_dir(tp_rank, stage, parallel.pp))
            os.makedirs(folder, exist_ok=True)
            writers.append(TorchFileWriter(template, os.path.join(folder, "model_optim_rng.pt")))
        streams = [(name_tensor for _, states in rank_states(reader, stage, r, as_pieces=True)
                    for name_tensor in states)
                   for r in range(parallel.tp)]
        try:
            for row in zip(*streams):  # the same key on every rank, in step
                for writer, (name, tensor) in zip(writers, row):
                    writer.write(name, tensor)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        for writer in writers:
            writer.close()
    with open(os.path.join(path, TRACKER), "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")


class LayerCachedSource(Mapping):
    """HF-named tensors from ``source`` for the writers: each read once (and counted, and cast to ``dtype``) while
    its layer is being written, however many ranks ask for it."""

    def __init__(self, source, dtype: torch.dtype | None, progress) -> None:
        self.source, self.dtype, self.progress = source, dtype, progress
        self._group: str | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        group = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        if group != self._group:
            self._group, self._cache = group, {}
        if name not in self._cache:
            tensor = self.source.tensor(name)
            if self.progress is not None:
                self.progress(tensor)
            self._cache[name] = tensor if self.dtype is None else tensor.to(self.dtype)
        return self._cache[name]

    def __iter__(self):
        raise TypeError("read by name only")

    def __len__(self) -> int:
        raise TypeError("read by name only")
