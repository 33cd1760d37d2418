"""Files the commands read and write: JSON lines read strictly; outputs written whole or not at all.

An output (a result file, a converted checkpoint folder) is written under a temporary name beside its target,
``.{name}.partial-{host}-{pid}-{random}``, and renamed into place only when complete. The temporary names carry the
writing process, so the next run into the same target removes what a killed run left (and puts back an older
output that a killed run had moved aside) without touching a run still in progress. Outputs get the permissions
the umask gives any new file or folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket

from aquila_npu.errors import AquilaNpuError, reported_os_errors


def _temporary_path(target: str, kind: str) -> str:
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(target: str) -> list[str]:
    """Remove what killed runs on this host left beside ``target`` (their process is gone); an older output a
    killed run had moved aside comes back to ``target`` when nothing replaced it. Returns the names removed."""
    folder, name = os.path.split(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(name)}\.(partial|old)-(.+)-(\d+)-[0-9a-f]{{8}}$")
    host, removed = socket.gethostname(), []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry)
        if not match or match.group(2) != host or _alive(int(match.group(3))):
            continue
        path = os.path.join(folder, entry)
        if match.group(1) == "old" and not os.path.lexists(target):
            os.replace(path, target)  # the run died between moving the old output aside and putting the new one
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def replaced_folder(target: str):
    """A new, empty temporary folder beside ``target``; when the block completes it becomes ``target`` (an older
    ``target`` is replaced), and when it fails it is removed."""
    remove_stale_temporaries(target)
    work = _temporary_path(target, "partial")
    os.makedirs(os.path.dirname(work), exist_ok=True)
    os.mkdir(work)  # mode 0o777 less the umask, as for any new folder (tempfile.mkdtemp would give 0o700)
    try:
        yield work
        if os.path.lexists(target):
            aside = _temporary_path(target, "old")
            os.replace(target, aside)
            os.replace(work, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _create_new_file(path: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file


def _write_probe(probe: str, where: str) -> None:
    """Create a file at ``probe``, write to it and sync it (so that a full disk shows too), and remove it."""
    with reported_os_errors(where):
        try:
            with os.fdopen(_create_new_file(probe), "w", encoding="utf-8") as f:
                f.write("ok\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            if os.path.exists(probe):
                os.unlink(probe)


def check_writable_file(path: str, flag: str) -> None:
    """Fail now, in one line, when ``path`` (the value of ``flag``) could not be written at the end of the run: a
    folder, a read-only or forbidden location, a full disk."""
    if os.path.isdir(path):
        raise AquilaNpuError(f"{flag} {path} is a folder; give a file path")
    _write_probe(_temporary_path(path, "partial"), f"{flag} {path}")


def check_writable_folder(path: str, flag: str) -> None:
    """Fail now, in one line, when the folder ``path`` (the value of ``flag``) cannot be created or written."""
    with reported_os_errors(f"{flag} {path}"):
        os.makedirs(path, exist_ok=True)
    _write_probe(_temporary_path(os.path.join(path, "write-test"), "partial"), f"{flag} {path}")


@contextlib.contextmanager
def atomic_text_file(path: str, flag: str | None = None):
    """A text file to write; it appears at ``path`` (replacing an older one) only when the block completes. A
    file-system failure (a full disk) is one ``AquilaNpuError`` naming ``flag`` (e.g. ``--output``) and ``path``."""
    with reported_os_errors(f"{flag} {path}" if flag else path):
        remove_stale_temporaries(path)
        tmp = _temporary_path(path, "partial")
        fd = _create_new_file(tmp)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def read_json_lines(path: str, label: str | None = None):
    """``(line number, object)`` for each non-blank line of a JSON-lines file; anything else — a line that is not
    JSON, not an object, or bytes that are not UTF-8 — is one ``AquilaNpuError`` naming ``label`` (default: the
    path) and the line."""
    label = label or path
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise AquilaNpuError(f"{label}, line {number}: invalid JSON ({exc.msg}); write one JSON object "
                                         f"per line") from None
                if not isinstance(record, dict):
                    raise AquilaNpuError(f"{label}, line {number}: expected a JSON object")
                yield number, record
    except UnicodeDecodeError as exc:
        raise AquilaNpuError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise AquilaNpuError(f"{label}: cannot read it ({type(exc).__name__}: {exc})") from None
