"""Hugging Face checkpoints: read single or sharded safetensors / ``pytorch_model*.bin``; write sharded safetensors.

Reading is lazy (safetensors one tensor at a time; ``.bin`` shards are loaded weights-only, memory-mapped, one
shard at a time). Writing streams: shards are planned from the spec's shapes, and each tensor is written into its
shard as it arrives.
"""

from __future__ import annotations

import json
import os
import shutil
import torch

from aquila_npu.errors import AquilaNpuError, first_line
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
        self._shapes = expected = hf_shapes(spec)
        # rotary inverse frequencies are derived, not learned; older Llama-style .bin checkpoints carry them
        unexpected = sorted(n for n in self._where if n not in expected and not n.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise AquilaNpuError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all); this is not "
                                 f"the Aquila2/Llama layout its config.json describes")
        missing = [name for name in expected if name not in self._where]
        if missing:
            raise AquilaNpuError(f"{path}: {len(missing)} tensor(s) the config implies are missing, e.g. "
                                 f"{missing[0]}; is this checkpoint complete and its config.json right?")

    def _index(self) -> dict[str, str]:
        files = set(os.listdir(self.path))
        for index_name in (SAFE_INDEX, BIN_INDEX):
            if index_name in files:
                weight_map = _read_weight_map(os.path.join(self.path, index_name))
                absent = sorted(set(weight_map.values()) - files)
                if absent:
                    raise AquilaNpuError(f"{self.path}: shard {absent[0]} named in {index_name} is missing; "
                                         f"copy all {len(set(weight_map.values()))} shards")
                return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if single in files:
                return {name: single for name in self._names_in(single)}
        raise AquilaNpuError(f"{self.path}: no model.safetensors, pytorch_model.bin or shard index found")

    def _safetensors(self, file: str):
        from aquila_npu.convert.streaming import SafetensorsFile

        if file not in self._open:
            self._open[file] = SafetensorsFile(os.path.join(self.path, file))
        return self._open[file]

    def _names_in(self, file: str) -> list[str]:
        if file.endswith(".safetensors"):
            return self._safetensors(file).keys()
        return list(self._load_bin(file))

    def _load_bin(self, file: str) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None  # drop the previous shard before loading the next
            from aquila_npu.convert.streaming import detach_from_mmap

            path = os.path.join(self.path, file)
            try:
                state = detach_from_mmap(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is one clear line
                raise AquilaNpuError(f"{path} cannot be read as plain weights ({type(exc).__name__}); "
                                     f"convert it to safetensors") from None
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    def tensor(self, name: str) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise AquilaNpuError(f"{self.path}: tensor {name} not found")
        if file.endswith(".safetensors"):
            tensor = self._safetensors(file).get_tensor(name)
        else:
            tensor = self._load_bin(file)[name]
            tensor = tensor.load() if hasattr(tensor, "load") else tensor
        expected = self._shapes.get(name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise AquilaNpuError(f"{self.path}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{expected}; config.json does not describe these weights")
        return tensor


def _read_weight_map(path: str) -> dict[str, str]:
    """The ``weight_map`` of a shard index: {tensor name: shard file name}, checked to be exactly that."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AquilaNpuError(f"{path} is not valid JSON ({first_line(exc)}); copy the index file again or "
                             f"re-save the model") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and
                                                   os.path.basename(v) == v for k, v in weight_map.items()):
        raise AquilaNpuError(f"{path} has no weight_map of tensor names to shard files in this folder; copy the "
                             f"index file again or re-save the model")
    return weight_map


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
    """Writes sharded safetensors (planned from the spec's shapes, filled tensor by tensor), the index,
    config.json and generation_config.json into ``path``."""

    def __init__(self, path: str, spec: ModelSpec, dtype: torch.dtype, tokenizer: TokenizerDefaults | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> None:
        from aquila_npu.convert.streaming import SafetensorsStreamWriter

        self.path, self.spec, self.dtype = path, spec, dtype
        self.tokenizer = tokenizer or TokenizerDefaults()
        element = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape in hf_shapes(spec).items():
            nbytes = int(torch.Size(shape).numel()) * element
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += nbytes
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [
            f"model-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]
        self.weight_map = {name: file for file, shard in zip(self.files, shards) for name, _, _ in shard}
        self.total_size = sum(int(torch.Size(shape).numel()) * element for shard in shards for _, shape, _ in shard)
        self._shards = list(zip(self.files, shards))
        self._writer: SafetensorsStreamWriter | None = None
        self._make = SafetensorsStreamWriter
        os.makedirs(path, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None or self._writer.done:
            file, planned = self._shards.pop(0)
            self._writer = self._make(os.path.join(self.path, file), planned)
        self._writer.write(name, tensor)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    def finish(self, tokenizer_source: str | None = None) -> None:
        if self._shards or (self._writer is not None and not self._writer.done):
            raise AquilaNpuError(f"{self.path}: the checkpoint was not written completely")
        if len(self.files) > 1:
            _write_json(os.path.join(self.path, SAFE_INDEX),
                        {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map})
        config = llama_config_dict(self.spec, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                                   self.tokenizer.pad_token_id)
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
