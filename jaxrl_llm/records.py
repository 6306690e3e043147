"""Reading records (one JSON object per example) from JSONL, JSON and Parquet files.

    for where, record in read_records("train.jsonl"):   # where = "train.jsonl:12"
        ...

Every problem a user can cause raises `DataError` saying what is wrong, where
(file and line, byte offset, row) and how to fix it. Records are read lazily;
a file that turns out to hold no record raises at the end of iteration.

This module is the bottom layer of the package (with `errors`): it imports only
jaxrl_llm.errors, so tasks (which read their files with it) and data (which builds
on tasks) can both use it without importing each other.
`jaxrl_llm.data.records` re-exports it for older imports.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

from jaxrl_llm.errors import DataError  # re-exported

SUFFIXES = (".jsonl", ".json", ".parquet")


def json_type(value: Any) -> str:
    """The JSON type of a value with its article, for messages: "an array", "a string", "null"."""
    name = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value))
    return name or f"a {type(value).__name__}"


def _check_path(path: pathlib.Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path (relative paths are from {pathlib.Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass one data file ({', '.join(SUFFIXES)})")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)} "
                        "(JSON Lines: one JSON object per line)")


def _jsonl(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    offset = 0  # byte offset of the current line in the file
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line_start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, written by some editors
                raw, line_start = raw[3:], line_start + 3
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: invalid UTF-8 byte {raw[e.start:e.start + 1]!r} at byte {e.start} of the line "
                    f"(byte {line_start + e.start} of the file); re-encode the file as UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`)") from None
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                                "complete JSON object, e.g. {\"prompt\": \"...\", \"answer\": \"...\"}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: line is {json_type(record)}, expected a JSON object "
                                "({\"field\": value, ...}) per line")
            yield where, record


def _json(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 byte {data[e.start:e.start + 1]!r} at byte {e.start} of the "
                        "file; re-encode the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); a .json file must hold "
                        "one JSON array of objects (use .jsonl for one object per line)") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: holds {json_type(records)}, expected an array of objects "
                        "[{...}, {...}] (use .jsonl for one object per line)")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}[{i}]: item is {json_type(record)}, expected an object")
        yield f"{path}[{i}]", record


def _parquet(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; `pip install pyarrow`, or convert the file to "
                        "JSON Lines") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


def read_records(path: str | pathlib.Path) -> Iterator[tuple[str, dict]]:
    """Yields (where, record) for every record of a .jsonl, .json (an array of objects) or .parquet file.

    where: "file.jsonl:12" (1-based line), "file.json[3]" (0-based array index), "file.parquet:row 12".
    Blank JSONL lines are skipped. Raises DataError for a missing file, malformed JSON, invalid UTF-8,
    a record that is not an object, or a file with no records.
    """
    path = pathlib.Path(path).expanduser()
    _check_path(path)
    reader = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}[path.suffix]
    n = 0
    for item in reader(path):
        n += 1
        yield item
    if n == 0:
        raise DataError(f"{path}: empty dataset (no records); expected at least one JSON object "
                        + ("per line" if path.suffix == ".jsonl" else "in the file"))
