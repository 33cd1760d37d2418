"""Hugging Face checkpoints: read single or sharded safetensors / ``pytorch_model*.bin``; write sharded safetensors.

Reading is lazy (safetensors are memory-mapped, one tensor at a time; ``.bin`` shards are loaded weights-only and
one shard at a time). Writing streams: tensors are appended to the current shard, which is written once it reaches
``max_shard_bytes``; shard names and the index are settled at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import torch

from aquila_npu.errors import AquilaNpuError
from aquila_npu.specs import ModelSpec, TokenizerDefaults, load_hf_config
from aquila_npu.weights import hf_shapes, llama_config_dict

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "special_tokens.txt", "tokenizer.model")


class HFCheckpoint:
    """A Hugging Face model folder, read tensor by tensor."""

    def __init__(self, path: str, spec: ModelSpec) -> None:
        self.path, self.spec = path, spec
        self._open: dict[str, object] = {}
        self._bin_cache: tuple[str, dict] | None = None
        self._where = self._index()  # tensor name -> file
        missing = [name for name in hf_shapes(spec) if name not in self._where]
        if missing:
            raise AquilaNpuError(f"{path}: {len(missing)} tensor(s) the config implies are missing, e.g. "
                                 f"{missing[0]}; is this checkpoint complete and its config.json right?")

    def _index(self) -> dict[str, str]:
        files = set(os.listdir(self.path))
        for index_name in (SAFE_INDEX, BIN_INDEX):
            if index_name in files:
                with open(os.path.join(self.path, index_name), encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                absent = sorted(set(weight_map.values()) - files)
                if absent:
                    raise AquilaNpuError(f"{self.path}: shard {absent[0]} named in {index_name} is missing; "
                                         f"copy all {len(set(weight_map.values()))} shards")
                return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if single in files:
                return {name: single for name in self._names_in(single)}
        raise AquilaNpuError(f"{self.path}: no model.safetensors, pytorch_model.bin or shard index found")

    def _names_in(self, file: str) -> list[str]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(os.path.join(self.path, file), framework="pt") as f:
                return list(f.keys())
        return list(self._load_bin(file))

    def _load_bin(self, file: str) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None  # drop the previous shard before loading the next
            try:
                state = torch.load(os.path.join(self.path, file), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is one clear line
                raise AquilaNpuError(f"{os.path.join(self.path, file)} cannot be read as plain weights "
                                     f"({type(exc).__name__}); convert it to safetensors") from None
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    def tensor(self, name: str) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise AquilaNpuError(f"{self.path}: tensor {name} not found")
        if file.endswith(".safetensors"):
            if file not in self._open:
                from safetensors import safe_open

                self._open[file] = safe_open(os.path.join(self.path, file), framework="pt")
            tensor = self._open[file].get_tensor(name)
        else:
            tensor = self._load_bin(file)[name]
        expected = hf_shapes(self.spec).get(name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise AquilaNpuError(f"{self.path}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{expected}; config.json does not describe these weights")
        return tensor


def load_state(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, in memory (for small models: tests, parity, quickstart)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    return state


def read_spec(path: str, plugins) -> ModelSpec:
    config = load_hf_config(path)
    return plugins.family_for_hf_config(config).spec_from_hf_config(config)


class HFWriter:
    """Writes sharded safetensors, an index, config.json and generation_config.json into ``path``."""

    def __init__(self, path: str, spec: ModelSpec, tokenizer: TokenizerDefaults | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> None:
        self.path, self.spec, self.tokenizer = path, spec, tokenizer or TokenizerDefaults()
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.dtype: torch.dtype | None = None
        os.makedirs(path, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.dtype = self.dtype or tensor.dtype
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._shard_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temporary = f"shard-{len(self._files) + 1:05d}.safetensors"
        save_file(self._shard, os.path.join(self.path, temporary), metadata={"format": "pt"})
        self._files.append((temporary, list(self._shard)))
        self._shard, self._shard_bytes = {}, 0

    def finish(self, tokenizer_source: str | None = None) -> None:
        if self._shard:
            self._flush()
        count = len(self._files)
        weight_map = {}
        for number, (temporary, names) in enumerate(self._files, start=1):
            final = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.path, temporary), os.path.join(self.path, final))
            weight_map.update({name: final for name in names})
        shapes = hf_shapes(self.spec)
        element = torch.empty((), dtype=self.dtype or torch.float32).element_size()
        total = sum(int(torch.Size(s).numel()) * element for n, s in shapes.items() if n in weight_map)
        if count > 1:
            _write_json(os.path.join(self.path, SAFE_INDEX),
                        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        config = llama_config_dict(self.spec, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                                   self.tokenizer.pad_token_id)
        if self.dtype is not None:
            config["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        _write_json(os.path.join(self.path, "config.json"), config)
        generation = {k: v for k, v in (("bos_token_id", self.tokenizer.bos_token_id),
                                         ("eos_token_id", self.tokenizer.eos_token_id),
                                         ("pad_token_id", self.tokenizer.pad_token_id)) if v is not None}
        _write_json(os.path.join(self.path, "generation_config.json"), generation)
        if tokenizer_source:
            copy_tokenizer(tokenizer_source, self.path)


def copy_tokenizer(source: str, target: str) -> None:
    """Copy a tokenizer (a folder, or a ``tokenizer.json`` whose folder holds the rest) next to the weights."""
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    found = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise AquilaNpuError(f"no tokenizer files in {folder}; pass the tokenizer folder or its tokenizer.json")
    for name in found:
        shutil.copyfile(os.path.join(folder, name), os.path.join(target, name))


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=False)
        f.write("\n")
