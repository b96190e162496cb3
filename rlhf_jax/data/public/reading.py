"""Reading public data files: JSON lines (``.jsonl``, ``.jsonl.gz``, ``.json``), a ``.json``
array, or parquet, given as files or directories of them.

Every record comes with where it is, for errors and nothing else: ``file:line`` (1-based)
for JSON lines, ``file:record i`` for a JSON array and ``file:row i`` for parquet (0-based,
as ``pyarrow`` and ``datasets`` index them).
"""

from __future__ import annotations

import gzip
import json
import pathlib
import re
from typing import Any, Iterator, Sequence

from rlhf_jax.data.jsonl import DataError

SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
Row = tuple[str, dict[str, Any]]  # (where, record)
# A file named e.g. train.jsonl.gz, test-00000-of-00001.parquet, validation_prefs.parquet,
# valid1.json belongs to that split; the word must start the name.
_SPLIT = re.compile(r"^(train|test|validation|valid\d*|val|dev|eval)(?![a-z])", re.IGNORECASE)


def is_data_file(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def input_files(inputs: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """The data files ``inputs`` name, directories expanded (recursively, sorted by path),
    in the order given; a path named twice is read once."""
    files: list[pathlib.Path] = []
    for given in inputs:
        path = pathlib.Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p))
            if not found:
                raise DataError(f"{path}: no data files in this directory (looked for {', '.join(SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            if not is_data_file(path):
                raise DataError(f"{path}: not a data file this reads ({', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return [pathlib.Path(p) for p in unique]


def split_of(path: pathlib.Path) -> str | None:
    """The split a file's name says it holds (``train``, ``test``, ``validation``, ``valid1``,
    ...), lower-cased, or None."""
    match = _SPLIT.match(path.name)
    return match.group(1).lower() if match else None


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_rows(path: pathlib.Path) -> Iterator[Row]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(1 << 12).lstrip()
    if head.startswith(b"["):  # one JSON array, not JSON lines
        with opener(path, "rb") as f:
            try:
                records = json.loads(f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}: not a valid JSON array ({err})") from None
        for i, obj in enumerate(records):
            if not isinstance(obj, dict):
                raise DataError(f"{path}:record {i}: expected a JSON object, got {type(obj).__name__}")
            yield f"{path}:record {i}", obj
        return
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {err.start})") from None
            yield where, _json_object(text, where)


def _parquet_rows(path: pathlib.Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # a dependency of tensorflow-datasets' array_record path

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield f"{path}:row {row}", obj
            row += 1


def read_rows(path: pathlib.Path) -> Iterator[Row]:
    """A data file's records in file order, each with where it is."""
    if path.name.lower().endswith(".parquet"):
        return _parquet_rows(path)
    return _json_rows(path)
