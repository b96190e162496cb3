"""What is labeled and what labelers wrote, on disk under ``<workdir>/labels/``.

- ``items.jsonl``: the set to label, written once so every restart shows the same items;
  one ``{"id": str, "prompt": str, "responses": [str] * K, "overlap": bool}`` a line.
  ``overlap`` items are shown to every labeler (inter-labeler agreement is measured on
  them); every other item is shown until one labeler has labeled it.
- ``<labeler>.jsonl``: one labeler's submissions in the comparisons format the RM reads,
  ``{"prompt", "responses", "ranks"}`` (0 = best, equal = tie), plus ``item_id``,
  ``labeler``, ``ratings`` (``[1..7] * K``, the paper's Likert scale), ``flags``
  (``{flag: [bool] * K}``), ``display_order`` (the response indices in the order the page
  first showed them), ``seconds`` (time on the item), ``guidelines`` (the guidelines'
  version) and ``time`` (ISO 8601, UTC), which the comparisons reader ignores.
- ``skips/<labeler>.jsonl``: ``{"item_id", "labeler", "reason", "note", "seconds", "time"}``
  per skip (not comparisons: the RM never reads them).

A new record is one ``write`` of the whole line on an ``O_APPEND`` descriptor, then
``fsync``; relabeling an item (after "back") rewrites the file to a temporary file and
renames it over the old one. Either way a kill leaves the old file or the new one. Writers
of one file are serialised by a thread lock and ``flock`` (two server processes too).

A line that cannot be read (edited by hand, damaged) is reported by :meth:`LabelStore.problems`
and otherwise ignored, so one bad line never stops anyone labeling; a rewrite keeps it as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
SKIPS_DIR = "skips"
# The paper's per-response metadata (Ouyang et al. 2022, Table 3 / Fig. 4): name -> what it means.
FLAGS = {
    "fails_instruction": "fails to follow the user's instruction",
    "fails_constraint": "fails an explicit constraint in the instruction (length, format, words to use)",
    "hallucination": "makes up facts or details that the prompt does not support",
    "inappropriate_language": "contains language inappropriate for a customer assistant",
}
RATING_SCALE = 7  # each response's overall quality, 1 (worst) to 7 (best), as in the paper
# Why a labeler skipped an item; "later" keeps it in their queue, the others take it out.
SKIP_REASONS = {
    "cant_judge": "I can't judge this (outside what I know)",
    "broken": "The prompt or the responses are broken or unreadable",
    "later": "Skip for now, show it to me again later",
    "other": "Other (say why)",
}
# A labeler's name becomes a file name: nothing that could leave the labels directory.
# fullmatch, not match: "$" would accept a trailing newline ("alice\n.jsonl").
LABELER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def labels_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / "labels"


def check_labeler(name: Any) -> str:
    """``name`` if it is a valid labeler id (letters, digits, ``_.-``, at most 64); else ValueError."""
    if not isinstance(name, str) or not LABELER_NAME.fullmatch(name) or name.endswith(".jsonl"):
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


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def make_record(item: dict[str, Any], labeler: str, ranks: list[int], **extra: Any) -> dict[str, Any]:
    """The line a submission writes: the comparisons fields first, then ``extra``
    (ratings, flags, display_order, seconds, guidelines; see the module doc) and the time."""
    return {"prompt": item["prompt"], "responses": item["responses"], "ranks": ranks, "item_id": item["id"],
            "labeler": labeler, **extra, "time": now()}


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of a labeler's file: the parsed record, or why it could not be read."""

    number: int
    text: str
    record: dict[str, Any] | None
    error: str | None


def _label_error(obj: Any) -> str | None:
    """Why ``obj`` is not a usable label record (None if it is)."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if not isinstance(obj.get("item_id"), str):
        return 'no string "item_id"'
    ranks, responses = obj.get("ranks"), obj.get("responses")
    if not isinstance(responses, list) or not isinstance(ranks, list) or len(ranks) != len(responses):
        return '"ranks" and "responses" must be lists of one length'
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        return '"ranks" must be integers >= 0'
    return None


def _skip_error(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("item_id"), str):
        return 'not a JSON object with a string "item_id"'
    if obj.get("reason") not in SKIP_REASONS:
        return f'"reason" must be one of {list(SKIP_REASONS)}'
    return None


class LabelStore:
    """The labels directory: appends and rewrites labelers' files safely (see module doc).

    Reads are cached by each file's size and modification time, so a queue request does not
    parse every labeler's file again when nothing changed.
    """

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._cache: dict[pathlib.Path, tuple[tuple[int, int, int], list[Line]]] = {}
        for path in [*self._label_files(), *sorted((self.directory / SKIPS_DIR).glob("*.jsonl"))]:
            _drop_torn_tail(path)

    def _label_files(self) -> list[pathlib.Path]:
        return sorted(p for p in self.directory.glob("*.jsonl") if p.name != ITEMS_NAME)

    def path(self, labeler: str) -> pathlib.Path:
        return self.directory / f"{check_labeler(labeler)}.jsonl"

    def skips_path(self, labeler: str) -> pathlib.Path:
        return self.directory / SKIPS_DIR / f"{check_labeler(labeler)}.jsonl"

    def labelers(self) -> list[str]:
        """Everyone with a labels file or a skips file."""
        names = {p.stem for p in self._label_files()}
        names |= {p.stem for p in (self.directory / SKIPS_DIR).glob("*.jsonl")}
        return sorted(n for n in names if LABELER_NAME.fullmatch(n))

    def lines(self, path: pathlib.Path, check=_label_error) -> list[Line]:
        """Every non-blank line of ``path``, parsed and checked (cached by size and mtime)."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a rewrite is a new inode
        with self._guard:
            cached = self._cache.get(path)
        if cached and cached[0] == key:
            return cached[1]
        out = []
        for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                out.append(Line(number, text, None, f"not JSON ({err.msg})"))
                continue
            error = check(obj)
            out.append(Line(number, text, None if error else obj, error))
        with self._guard:
            self._cache[path] = (key, out)
        return out

    def records(self, labeler: str) -> list[dict[str, Any]]:
        """The readable records of one labeler's file, in file order."""
        return [line.record for line in self.lines(self.path(labeler)) if line.record is not None]

    def labels(self, labeler: str) -> dict[str, dict[str, Any]]:
        """``item_id -> record`` for one labeler."""
        return {r["item_id"]: r for r in self.records(labeler)}

    def skips(self, labeler: str) -> dict[str, dict[str, Any]]:
        """``item_id -> latest skip record`` for one labeler (labeled since or not)."""
        lines = self.lines(self.skips_path(labeler), _skip_error)
        return {line.record["item_id"]: line.record for line in lines if line.record is not None}

    def problems(self) -> list[str]:
        """``file:line: what is wrong`` for every line that cannot be read, in every file."""
        out = []
        for path in self._label_files():
            out += [f"{path}:{line.number}: {line.error}" for line in self.lines(path) if line.error]
        for path in sorted((self.directory / SKIPS_DIR).glob("*.jsonl")):
            out += [f"{path}:{line.number}: {line.error}" for line in self.lines(path, _skip_error) if line.error]
        return out

    def save(self, record: dict[str, Any]) -> None:
        """Appends ``record`` to its labeler's file, or replaces that labeler's earlier record
        of the same item (so the file never holds one item twice; unreadable lines are kept)."""
        path = self.path(record["labeler"])
        with self._hold(path):
            existing = self.lines(path)
            if any(line.record and line.record["item_id"] == record["item_id"] for line in existing):
                kept = [json.dumps(record) if line.record and line.record["item_id"] == record["item_id"]
                        else line.text for line in existing]
                _replace(path, "".join(text + "\n" for text in kept).encode())
            else:
                _append(path, record)
            self._forget(path)

    def save_skip(self, record: dict[str, Any]) -> None:
        path = self.skips_path(record["labeler"])
        path.parent.mkdir(exist_ok=True)
        with self._hold(path):
            _append(path, record)
            self._forget(path)

    def _forget(self, path: pathlib.Path) -> None:
        with self._guard:
            self._cache.pop(path, None)

    @contextlib.contextmanager
    def _hold(self, path: pathlib.Path) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(str(path), threading.Lock())
        with lock:
            fd = os.open(self.directory / ".write.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a second server process on the same directory
                yield
            finally:
                os.close(fd)


def _append(path: pathlib.Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())  # one write of the whole line: no interleaving
        os.fsync(fd)
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
