"""Readers and writers that hold one tensor in memory at a time.

* ``TorchFileWriter``: a ``torch.save`` file (what Megatron's per-rank ``model_optim_rng.pt`` is). The structure
  is saved first by ``torch.save`` itself under ``torch.serialization.skip_data`` with fake tensors, which reserves
  each storage's record; each real tensor is then written into its record as it is produced.
* ``SafetensorsStreamWriter``: a safetensors file whose header is written from the planned shapes, followed by each
  tensor's bytes as it arrives.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Iterable

import torch

from aquila_npu.errors import AquilaNpuError

# the safetensors format's own limit on the JSON header (100 MB)
MAX_SAFETENSORS_HEADER = 100_000_000
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8"}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class _BackgroundWrites:
    """Positional file writes done by one background thread (``write`` syscalls release the GIL, so writing
    overlaps reading and the layout transform); at most ``depth`` tensors wait. Errors surface on the next call."""

    def __init__(self, path: str, mode: str, depth: int = 4) -> None:
        import queue
        import threading

        self.path = path
        self._file = open(path, mode)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None

        def run() -> None:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._error is not None:
                    continue
                offset, tensor = item
                try:
                    if offset is not None:
                        self._file.seek(offset)
                    self._file.write(_raw_bytes(tensor))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

        self._thread = threading.Thread(target=run, name="aquila-npu-writer", daemon=True)
        self._thread.start()

    def write(self, tensor: torch.Tensor, offset: int | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((offset, tensor))

    def write_now(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._file.close()
        if self._error is not None:
            raise self._error


def fake_like(shapes: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (no memory) that ``torch.save`` under ``skip_data`` can record."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = list(shapes)  # evaluated outside the fake mode
    with FakeTensorMode():
        return {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in shapes}


def _storage_records(path: str) -> list[tuple[int, int]]:
    """(data offset, size) of each storage record ``data/0``, ``data/1``, ... of a torch.save zip file."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        records = {}
        for info in archive.infolist():
            head, _, index = info.filename.rpartition("/data/")
            if head and index.isdigit():
                f.seek(info.header_offset)
                header = f.read(30)
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                records[int(index)] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return [records[i] for i in range(len(records))]


class TorchFileWriter:
    """A ``torch.save`` file of ``template`` (whose tensors are ``fake_like`` stand-ins, in the order they will be
    written): the structure is saved at once, each tensor's bytes are filled in later with ``write``."""

    def __init__(self, template: dict, path: str) -> None:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(template, path)
        self.path = path
        self._records = _storage_records(path)
        self._next = 0
        self._file = _BackgroundWrites(path, "r+b")

    def write(self, name: str, tensor) -> None:
        """Fill the next record with ``tensor`` (a tensor, or ``weights.Pieces`` stored block after block)."""
        if self._next >= len(self._records):
            raise AquilaNpuError(f"{self.path}: more tensors than the planned layout ({name})")
        offset, size = self._records[self._next]
        parts = getattr(tensor, "parts", [tensor])
        if sum(p.numel() * p.element_size() for p in parts) != size:
            raise AquilaNpuError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} does not fit its planned record "
                                 f"of {size} bytes (mixed dtypes in the source? pass --params-dtype)")
        for part in parts:
            self._file.write(part, offset)
            offset += part.numel() * part.element_size()
        self._next += 1

    def abort(self) -> None:
        """Stop writing (the file is incomplete; the caller removes it)."""
        try:
            self._file.close()
        except BaseException:  # noqa: BLE001 - the error that made us abort is the one that matters
            pass

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._records):
            raise AquilaNpuError(f"{self.path}: {self._next} tensors written, {len(self._records)} planned")


class SafetensorsStreamWriter:
    """One safetensors file: the header from the planned ``(name, shape, dtype)`` list, then the data in order."""

    def __init__(self, path: str, planned: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in planned:
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._planned = list(planned)
        self._next = 0
        self._file = _BackgroundWrites(path, "wb")
        self._file.write_now(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor) -> None:
        """Append ``tensor`` (a tensor, or ``weights.Pieces`` stored block after block)."""
        expected_name, shape, dtype = self._planned[self._next]
        if name != expected_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise AquilaNpuError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} arrived where {expected_name} "
                                 f"{dtype} {tuple(shape)} was planned (mixed dtypes in the source? pass "
                                 f"--params-dtype)")
        for part in getattr(tensor, "parts", [tensor]):
            self._file.write(part)
        self._next += 1
        if self._next == len(self._planned):
            self.close()

    @property
    def done(self) -> bool:
        return self._next == len(self._planned)

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        try:
            self._file.close()
        except BaseException:  # noqa: BLE001 - the error that made us abort is the one that matters
            pass


# ------------------------------------------------------------------------------------------------ readers
# Memory-mapped reads leave every page they touch resident for as long as the file stays mapped, so reading a whole
# checkpoint through mmap grows the process to the model's size. These readers use plain positional reads into
# fresh tensors instead: a tensor's memory is returned as soon as the caller drops it.
_SAFETENSORS_TORCH = {value: key for key, value in SAFETENSORS_DTYPES.items()}


def _read_tensor(f, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)  # not zero-filled: the read writes every byte
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        f.seek(offset)
        if f.readinto(_raw_bytes(tensor)) != nbytes:
            raise AquilaNpuError(f"{f.name}: truncated (expected {nbytes} bytes at offset {offset})")
    return tensor


class SafetensorsFile:
    """One safetensors file: the header parsed once, each tensor read on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise AquilaNpuError(f"{path}: not a safetensors file (truncated header)")
            (length,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):  # read nothing a damaged length field asks for
                raise AquilaNpuError(f"{path}: not a safetensors file (its header claims {length:,} bytes of a "
                                     f"{size:,}-byte file); copy the file again")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise AquilaNpuError(f"{path}: not a safetensors file (unreadable header)") from None
        if not isinstance(header, dict):
            raise AquilaNpuError(f"{path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        try:
            dtype, shape, start = _SAFETENSORS_TORCH.get(entry["dtype"]), entry["shape"], entry["data_offsets"][0]
        except (KeyError, TypeError, IndexError):
            raise AquilaNpuError(f"{self.path}: the header entry of {name} is malformed; copy the file again") from None
        if dtype is None:
            raise AquilaNpuError(f"{self.path}: {name} has unsupported dtype {entry['dtype']}")
        with open(self.path, "rb") as f:
            return _read_tensor(f, self._data_start + start, shape, dtype)


def detach_from_mmap(state, path: str):
    """Replace every tensor in ``state`` (a structure ``torch.load(path, mmap=True)`` returned) by a lazy handle
    that reads it with a positional read. Finding a tensor's record only reads its storage address, which touches
    no page of the mapping."""
    tensors = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            tensors.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(state)
    if not tensors:
        return state
    records = _storage_records(path)
    base = min(t.untyped_storage().data_ptr() for t in tensors) - min(offset for offset, _ in records)

    def convert(node):
        if isinstance(node, torch.Tensor):
            if not node.is_contiguous():
                return node.clone()
            offset = node.untyped_storage().data_ptr() - base + node.storage_offset() * node.element_size()
            return LazyTensor(path, offset, tuple(node.shape), node.dtype)
        if isinstance(node, dict):
            return {k: convert(v) for k, v in node.items()}
        if isinstance(node, list):
            return [convert(v) for v in node]
        if isinstance(node, tuple):
            return tuple(convert(v) for v in node)
        return node

    return convert(state)


class LazyTensor:
    """A tensor in a file, read when ``load()`` is called."""

    __slots__ = ("path", "offset", "shape", "dtype")

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    def load(self) -> torch.Tensor:
        with open(self.path, "rb") as f:
            return _read_tensor(f, self.offset, self.shape, self.dtype)


class Prefetched:
    """Reads ``source`` ahead on a background thread, in the order the writer will ask (file reads and tensor
    copies release the GIL, so reading overlaps writing). At most ``depth`` tensors wait in memory."""

    def __init__(self, source, names: list[str], depth: int = 4) -> None:
        import queue
        import threading

        self.spec = source.spec
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def run() -> None:
            for name in names:
                if self._stop.is_set():
                    return
                try:
                    item = (name, source.tensor(name))
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                    self._queue.put((name, exc))
                    return
                self._queue.put(item)

        self._thread = threading.Thread(target=run, name="aquila-npu-prefetch", daemon=True)
        self._thread.start()

    def tensor(self, name: str) -> torch.Tensor:
        got, value = self._queue.get()
        if isinstance(value, BaseException):
            raise value
        if got != name:
            raise RuntimeError(f"prefetch order broken: asked for {name}, read {got}")
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except Exception:  # noqa: BLE001 - queue.Empty: the thread is finishing
                pass
