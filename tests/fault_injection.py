"""Test-only file-system faults: a full disk and a read-only folder, in this process and every Python process it
starts (through ``sitecustomize`` in ``tests/fault_site``).

Why not the real thing: the tests run as root, which no permission bit stops, and mounting a small tmpfs needs
privileges a CI machine may not give. So the faults are raised where Python meets the file system, with the errno
the kernel would give; everything above that — our writers, megatron-core's savers, torch.save into a file object
— runs unchanged.

* ``AQUILA_NPU_TEST_FULL_DISK=/path:N``: a file opened for writing under ``/path`` fails with ENOSPC once this
  process has written N bytes to files there.
* ``AQUILA_NPU_TEST_READ_ONLY=/path``: creating, opening for writing, renaming into or removing anything under
  ``/path`` fails with EROFS; ``AQUILA_NPU_TEST_FORBIDDEN=/path``: the same with EACCES (no write permission).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

FULL_DISK = "AQUILA_NPU_TEST_FULL_DISK"
READ_ONLY = "AQUILA_NPU_TEST_READ_ONLY"
FORBIDDEN = "AQUILA_NPU_TEST_FORBIDDEN"
SITE = str(Path(__file__).resolve().parent / "fault_site")

_real = {"open": builtins.open, "os.open": os.open, "os.mkdir": os.mkdir,
         "os.replace": os.replace, "os.rename": os.rename, "os.unlink": os.unlink, "os.remove": os.remove,
         "os.rmdir": os.rmdir}
_state: dict = {"full": None, "budget": 0, "refused": None, "errno": errno.EROFS}


def environment(full_disk: tuple[Path, int] | None = None, read_only: Path | None = None,
                forbidden: Path | None = None) -> dict[str, str]:
    """The environment that gives a child process these faults (PYTHONPATH carries the sitecustomize)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)}
    if full_disk:
        env[FULL_DISK] = f"{full_disk[0]}:{full_disk[1]}"
    if read_only:
        env[READ_ONLY] = str(read_only)
    if forbidden:
        env[FORBIDDEN] = str(forbidden)
    return env


def _under(path, root) -> bool:
    if root is None or isinstance(path, int):
        return False
    try:
        real = os.path.realpath(os.fspath(path))
    except TypeError:
        return False
    return real == root or real.startswith(root + os.sep)


def _writing(mode: str | int) -> bool:
    if isinstance(mode, int):
        return bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
    return any(c in mode for c in "wax+")


def _fault(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), os.fspath(path) if path is not None else None)


class _FullDiskRaw(io.RawIOBase):
    """The raw file under Python's own buffered and text layers, as the kernel behaves on a full disk: writes
    succeed while the byte budget lasts (the last one partly), then fail with ENOSPC."""

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if _state["budget"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file, as the kernel's
        written = self._raw.write(data[:_state["budget"]])
        _state["budget"] -= written
        return written

    def readinto(self, buffer) -> int:
        return self._raw.readinto(buffer)

    def readable(self) -> bool:
        return self._raw.readable()

    def writable(self) -> bool:
        return self._raw.writable()

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, *args) -> int:
        return self._raw.seek(*args)

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, *args) -> int:
        return self._raw.truncate(*args)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        super().close()
        self._raw.close()

    @property
    def name(self):
        return self._raw.name

    @property
    def mode(self) -> str:
        return self._raw.mode


def _open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
    if _writing(mode) and _under(file, _state["refused"]):
        raise _fault(_state["errno"], file)
    if not (_writing(mode) and _under(file, _state["full"])):
        return _real["open"](file, mode, buffering, encoding, errors, newline, closefd, opener)
    raw = _FullDiskRaw(io.FileIO(file, mode.replace("b", "").replace("t", ""), closefd, opener))
    if "b" in mode and buffering == 0:
        return raw
    size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
    buffered = (io.BufferedRandom if "+" in mode else io.BufferedWriter)(raw, size)
    if "b" in mode:
        return buffered
    return io.TextIOWrapper(buffered, encoding, errors, newline, line_buffering=buffering == 1)


def _os_open(path, flags, *args, **kwargs):
    if _writing(flags) and _under(path, _state["refused"]):
        raise _fault(_state["errno"], path)
    fd = _real["os.open"](path, flags, *args, **kwargs)
    if _writing(flags) and _under(path, _state["full"]) and _state["budget"] <= 0:
        # a raw descriptor cannot be metered: once the budget is spent, it writes to /dev/full (ENOSPC)
        full = _real["os.open"]("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
    return fd


def _refuse_under(name: str, *positions: int):
    real = _real[name]

    def call(*args, **kwargs):
        for i in positions:
            if i < len(args) and _under(args[i], _state["refused"]):
                raise _fault(_state["errno"], args[i])
        return real(*args, **kwargs)

    return call


def install(full_disk: tuple[str, int] | None = None, read_only: str | None = None,
            forbidden: str | None = None) -> None:
    _state["full"] = os.path.realpath(full_disk[0]) if full_disk else None
    _state["budget"] = int(full_disk[1]) if full_disk else 0
    refused = read_only or forbidden
    _state["refused"] = os.path.realpath(refused) if refused else None
    _state["errno"] = errno.EROFS if read_only else errno.EACCES
    builtins.open = io.open = _open
    os.open = _os_open
    os.mkdir = _refuse_under("os.mkdir", 0)
    os.replace = _refuse_under("os.replace", 0, 1)
    os.rename = _refuse_under("os.rename", 0, 1)
    for name in ("unlink", "remove", "rmdir"):
        setattr(os, name, _refuse_under(f"os.{name}", 0))


def uninstall() -> None:
    builtins.open = io.open = _real["open"]
    for key, value in _real.items():
        if key.startswith("os."):
            setattr(os, key[3:], value)
    _state.update(full=None, budget=0, refused=None, errno=errno.EROFS)


def install_from_environment() -> None:
    full = os.environ.get(FULL_DISK)
    read_only, forbidden = os.environ.get(READ_ONLY), os.environ.get(FORBIDDEN)
    if full or read_only or forbidden:
        root, _, budget = full.rpartition(":") if full else ("", "", "0")
        install((root, int(budget)) if full else None, read_only, forbidden)
