"""Files the commands read and write: JSON lines read strictly, result files written whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_text_file(path: str):
    """A text file to write; it appears at ``path`` (replacing an older one) only when the block completes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
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
    from aquila_npu.errors import AquilaNpuError

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
