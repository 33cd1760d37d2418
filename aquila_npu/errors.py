"""The one exception type users see: its message is a single line that says what is wrong and how to fix it."""

from __future__ import annotations

import contextlib
import errno
import os
import re


class AquilaNpuError(Exception):
    """A user-facing error. Command-line entry points print ``aquila-npu: error: <message>`` and exit with 2."""


class UnsafeFileError(BaseException):
    """A file refused because reading it would run code (a crafted pickle in a checkpoint). Its message is one line,
    as an ``AquilaNpuError``'s; it derives from ``BaseException`` so that no library's ``except Exception`` fallback
    swallows the refusal and carries on (torch.distributed.checkpoint's loader would retry with other metadata and
    fold the message into an AssertionError)."""


# what command-line entry points report in one line (exit status 2)
USER_ERRORS = (AquilaNpuError, UnsafeFileError)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message, for a one-line error of ours that quotes it."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


# what a file-system failure means to the user, and what to do about it
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or write somewhere else"),
    errno.EACCES: ("permission denied", "choose a location you may write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you may write, or fix its permissions"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("it is a folder", "give a file path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EIO: ("input/output error", "the device is failing: check it, then retry"),
}


def os_error_message(exc: OSError, where: str | None = None) -> str:
    """One line for a file-system failure: where (``where``, e.g. ``--save-dir out``, with the file that failed
    unless it is one of our temporary names; else that file), what, and how to fix it."""
    what, fix = _OS_ERRORS.get(exc.errno, (exc.strerror or first_line(exc), "check the path and retry"))
    filename = str(exc.filename) if exc.filename else None
    if where and filename and ".partial" not in filename and not where.endswith(filename):
        where = f"{where} ({filename})"
    return f"{where or filename or 'a file'}: {what}; {fix}"


def write_failure_message(exc: BaseException, where: str) -> str:
    """One line for a failed write of ``where``: the file-system error behind ``exc`` when there is one (a library
    may re-raise it as another type), else what failed with a hint at the usual causes."""
    current, seen = exc, set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return os_error_message(current, where)
        quoted = re.search(r"\[Errno (\d+)\]", str(current))  # a worker process's error, passed on as text
        if quoted:
            code = int(quoted.group(1))
            return os_error_message(OSError(code, os.strerror(code)), where)
        current = current.__cause__ or current.__context__
    return (f"{where}: writing failed ({type(exc).__name__}: {first_line(exc)}); is the disk full or the location "
            f"not writable? Free space there or write somewhere else")


@contextlib.contextmanager
def reported_os_errors(where: str):
    """File-system failures inside the block become one ``AquilaNpuError`` naming ``where`` (e.g. ``--save-dir
    out``) when the failing call did not name a file itself (a ``write`` that hit a full disk)."""
    try:
        yield
    except OSError as exc:
        raise AquilaNpuError(os_error_message(exc, where)) from None
