"""Input records for preprocessing: parquet, a JSON list or JSON lines, one file, a folder or a glob.

Every reader streams fixed-size batches (pyarrow's batch reader for parquet, an incremental decoder for JSON), so
memory stays flat however large the input. A batch carries each record's position in its file, so a bad record can
be named: ``row N`` (0-based, as pandas and ``datasets`` count) for parquet and JSON lists, ``line N`` (1-based) for
JSON lines.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

from aquila_npu.errors import AquilaNpuError

FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
MISSING = object()  # a field a JSON record does not have (``None`` is a field that is null)


@dataclass
class RecordBatch:
    path: str
    unit: str                      # "row" or "line"
    positions: list[int]           # each record's row / line in its file
    columns: dict[str, list]       # field -> values as read (MISSING, None, str, bytes, or anything else)
    bad: dict[int, str] = field(default_factory=dict)  # record index -> why it could not be read at all

    def where(self, index: int) -> str:
        return f"{self.path} {self.unit} {self.positions[index]}"

    def __len__(self) -> int:
        return len(self.positions)


def as_text(name: str, value, required: bool) -> tuple[str | None, str | None]:
    """(text, None) for a usable field value, else (None, why not). An optional field may be absent or null."""
    if value is MISSING or value is None:
        if not required:
            return "", None
        return None, f"field {name!r} is {'missing' if value is MISSING else 'null'}"
    if isinstance(value, bytes):  # a parquet binary column
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, f"field {name!r} holds bytes that are not valid UTF-8"
    if not isinstance(value, str):
        return None, f"field {name!r} is {type(value).__name__}, not text"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: undecodable bytes in the file, or a bad \\u escape
            return None, f"field {name!r} holds bytes that are not valid UTF-8"
    return value, None


def input_files(spec: str) -> list[str]:
    """The files ``--input`` names: a file, every supported file under a folder, or a glob; sorted, so that runs
    are reproducible."""
    if os.path.isdir(spec):
        found = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                       if os.path.isfile(p) and _format(p, strict=False))
        if not found:
            raise AquilaNpuError(f"--input {spec}: the folder has no {'/'.join(sorted(FORMATS))} files")
        return found
    if any(ch in spec for ch in "*?["):
        found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise AquilaNpuError(f"--input {spec}: the pattern matches no file")
        for path in found:
            _format(path)
        return found
    if not os.path.isfile(spec):
        raise AquilaNpuError(f"--input {spec}: no such file or folder")
    _format(spec)
    return [spec]


def _format(path: str, strict: bool = True) -> str | None:
    kind = FORMATS.get(os.path.splitext(path)[1].lower())
    if kind is None and strict:
        raise AquilaNpuError(f"--input {path}: unsupported format; give parquet (.parquet), a JSON list or JSON "
                             f"lines (.json, .jsonl)")
    return kind


def read_batches(path: str, fields: list[str], optional: list[str], batch_size: int) -> Iterator[RecordBatch]:
    """Batches of the named fields from one file. A parquet file without a required column is an error here
    (every row would be bad); a JSON record without a field reads as MISSING and is judged by the caller."""
    if _format(path) == "parquet":
        yield from _parquet_batches(path, fields, optional, batch_size)
    else:
        yield from _json_batches(path, fields + optional, batch_size)


def _parquet_batches(path, fields, optional, batch_size):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
        raise AquilaNpuError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    absent = [f for f in fields if f not in names]
    if absent:
        raise AquilaNpuError(f"{path}: no column {', '.join(map(repr, absent))} (columns: {', '.join(names)}); "
                             f"pick the columns with --json-keys or another --handler-name")
    present = [f for f in fields + optional if f in names]
    row, batches = 0, parquet.iter_batches(batch_size=batch_size, columns=present)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            columns = {name: batch.column(name).to_pylist() for name in present}
        except Exception as exc:  # pyarrow's errors for damaged pages or invalid UTF-8 in a string column
            raise AquilaNpuError(f"{path}: cannot read the rows from {row} on ({type(exc).__name__}: {exc}); "
                                 f"repair or re-export the file") from None
        for name in optional:
            columns.setdefault(name, [MISSING] * batch.num_rows)
        yield RecordBatch(path, "row", list(range(row, row + batch.num_rows)), columns)
        row += batch.num_rows


def _json_batches(path, fields, batch_size):
    is_list = _is_list(path)
    records = _json_list_records(path) if is_list else _json_lines_records(path)
    while True:
        positions, columns, bad = [], {name: [] for name in fields}, {}
        for position, record, problem in records:
            if problem is not None:
                bad[len(positions)] = problem
                record = {}
            elif not isinstance(record, dict):
                bad[len(positions)] = f"is a JSON {type(record).__name__}, not an object"
                record = {}
            positions.append(position)
            for name in fields:
                columns[name].append(record.get(name, MISSING))
            if len(positions) == batch_size:
                break
        if not positions:
            return
        yield RecordBatch(path, "row" if is_list else "line", positions, columns, bad)


def _is_list(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_lines_records(path: str):
    """(line number, record, problem) for each non-blank line. Undecodable bytes become lone surrogates
    (``surrogateescape``), which ``as_text`` reports with the record's position."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", "surrogateescape").strip()
            if number == 1:
                line = line.lstrip("\ufeff")
            if not line:
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield number, None, f"is not valid JSON ({exc.msg} at column {exc.colno})"


def _json_list_records(path: str, chunk_chars: int = 1 << 22):
    """Records of a top-level JSON list, decoded object by object from a sliding text buffer."""
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    with open(path, "rb") as f:
        buffer, pos, eof, row = "", 0, False, 0

        def fill(minimum: int) -> bool:
            nonlocal buffer, pos, eof
            if eof:
                return False
            data = f.read(max(minimum, chunk_chars))
            eof = not data
            buffer = buffer[pos:] + text_decoder.decode(data, final=eof)
            pos = 0
            return True

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buffer) or not fill(chunk_chars):
                    return buffer[pos] if pos < len(buffer) else ""

        if skip_space() != "[":
            raise AquilaNpuError(f"{path}: not a JSON list or JSON lines")
        pos += 1
        expect_value = True
        while True:
            ch = skip_space()
            if ch == "]":
                return
            if ch == "," and not expect_value:
                pos += 1
                expect_value = True
                continue
            if ch == "" or not expect_value:
                raise AquilaNpuError(f"{path} row {row}: the JSON list is cut short or malformed; "
                                     f"fix the file (it must be one list of objects)")
            want = chunk_chars
            while True:
                try:
                    record, end = decoder.raw_decode(buffer, pos)
                    break
                except json.JSONDecodeError as exc:
                    # an object split across chunks looks malformed until the rest is read
                    if not fill(want):
                        raise AquilaNpuError(f"{path} row {row}: not valid JSON ({exc.msg}); fix the record "
                                             f"(a JSON list cannot be resynchronised, so it cannot be skipped)"
                                             ) from None
                    want *= 2
            pos = end
            yield row, record, None
            row += 1
            expect_value = False
