"""What is labeled and what labelers wrote, on disk under ``<workdir>/labels/``.

- ``items.jsonl``: the set to label, written once so every restart shows the same items;
  one ``{"id": str, "prompt": str, "responses": [str] * K, "overlap": bool}`` a line.
  ``overlap`` items are shown to every labeler (inter-labeler agreement is measured on
  them); every other item is shown until one labeler has labeled it.
- ``<labeler>.jsonl``: one labeler's submissions in the comparisons format the RM reads,
  ``{"prompt", "responses", "ranks"}`` (0 = best, equal = tie), plus ``item_id``,
  ``labeler``, ``flags`` (``{flag: [bool] * K}``) and ``time`` (ISO 8601, UTC), which the
  comparisons reader ignores.

A new label is one ``write`` of the whole line on an ``O_APPEND`` descriptor, then
``fsync``; relabeling an item (after "back") rewrites the file to a temporary file and
renames it over the old one. Either way a kill leaves the old file or the new one. Writers
of one file are serialised by a thread lock and ``flock`` (two server processes too).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from rlhf_jax.data.jsonl import MAX_RESPONSES, MIN_RESPONSES, DataError, read_records

ITEMS_NAME = "items.jsonl"
# The paper's per-response metadata (Ouyang et al. 2022, Table 3 / Fig. 4).
FLAGS = ("fails_instruction", "fails_constraint", "hallucination", "inappropriate_language")
# A labeler's name becomes a file name: nothing that could leave the labels directory.
LABELER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def labels_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / "labels"


def check_labeler(name: Any) -> str:
    """``name`` if it is a valid labeler id (letters, digits, ``_.-``, at most 64); else ValueError."""
    if not isinstance(name, str) or not LABELER_NAME.match(name) or name.endswith(".jsonl"):
        raise ValueError(f"labeler name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit")
    if f"{name}.jsonl" == ITEMS_NAME:
        raise ValueError(f"labeler name {name!r} is taken by the items file; choose another")
    return name


def make_items(pairs: list[tuple[str, list[str]]], overlap: int) -> list[dict[str, Any]]:
    """Items from ``(prompt, responses)`` pairs; the first ``overlap`` are shown to everyone."""
    items = []
    for i, (prompt, responses) in enumerate(pairs):
        if not MIN_RESPONSES <= len(responses) <= MAX_RESPONSES:
            raise DataError(f"item {i} ({prompt[:40]!r}...): {len(responses)} responses; a comparison "
                            f"needs {MIN_RESPONSES} to {MAX_RESPONSES}")
        items.append({"id": str(i), "prompt": prompt, "responses": list(responses), "overlap": i < overlap})
    return items


def write_items(directory: pathlib.Path, items: list[dict[str, Any]]) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ITEMS_NAME
    _replace(path, "".join(json.dumps(item) + "\n" for item in items).encode())
    return path


def read_items(directory: pathlib.Path) -> list[dict[str, Any]]:
    """The items of ``directory/items.jsonl``, validated; errors name file and line."""
    path = directory / ITEMS_NAME
    if not path.is_file():
        raise DataError(f"{path}: no items to label yet; run `rlhf-jax label` with --prompts FILE "
                        "(prompts with responses) or --policy EXPORT to create them")
    records = read_records(path, "responses")  # validated, errors naming file and line
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]  # for id, overlap
    items, seen = [], set()
    for (number, record), obj in zip(records, raw, strict=True):
        item_id = obj.get("id")
        if not isinstance(item_id, str) or item_id in seen:
            raise DataError(f'{path}:{number}: "id" must be a string unique in the file, got {item_id!r}')
        seen.add(item_id)
        items.append({"id": item_id, **record, "overlap": bool(obj.get("overlap", False))})
    return items


def make_record(item: dict[str, Any], labeler: str, ranks: list[int],
                flags: dict[str, list[bool]]) -> dict[str, Any]:
    """The line a submission appends (comparisons fields first)."""
    return {"prompt": item["prompt"], "responses": item["responses"], "ranks": ranks,
            "item_id": item["id"], "labeler": labeler, "flags": flags,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


class LabelStore:
    """The labels directory: appends and rewrites labelers' files safely (see module doc)."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        for path in sorted(self.directory.glob("*.jsonl")):
            if path.name != ITEMS_NAME:
                _drop_torn_tail(path)

    def path(self, labeler: str) -> pathlib.Path:
        return self.directory / f"{check_labeler(labeler)}.jsonl"

    def labelers(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.jsonl") if p.name != ITEMS_NAME)

    def records(self, labeler: str) -> list[dict[str, Any]]:
        """Every record of one labeler's file, in file order (the file's own JSON objects)."""
        path = self.path(labeler)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def labels(self, labeler: str) -> dict[str, dict[str, Any]]:
        """``item_id -> record`` for one labeler."""
        return {r["item_id"]: r for r in self.records(labeler) if "item_id" in r}

    def save(self, record: dict[str, Any]) -> None:
        """Appends ``record`` to its labeler's file, or replaces that labeler's earlier record
        of the same item (so the file never holds one item twice)."""
        path = self.path(record["labeler"])
        line = (json.dumps(record) + "\n").encode()
        with self._hold(path):
            existing = self.records(record["labeler"])
            if any(r.get("item_id") == record["item_id"] for r in existing):
                kept = [r if r.get("item_id") != record["item_id"] else record for r in existing]
                _replace(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
                return
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of the whole line: no interleaving with other appenders
                os.fsync(fd)
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _hold(self, path: pathlib.Path) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(path.name, threading.Lock())
        with lock:
            fd = os.open(self.directory / ".write.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a second server process on the same directory
                yield
            finally:
                os.close(fd)


def _replace(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop_torn_tail(path: pathlib.Path) -> None:
    """A line cut short by a crash (no final newline) would make the file unreadable for
    the RM; it is moved to ``<file>.torn`` with a warning."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(data[keep:] + b"\n")
    _replace(path, data[:keep])
    warnings.warn(f"{path}: its last line was cut short (a crash while writing?); moved it to {torn}")
