"""Files written whole or not at all: the text goes to a temporary file beside the target,
which then replaces it (``os.replace`` is atomic on POSIX), so a reader or a process killed
midway never sees half a file. The temporary name is unique, so two writers never share it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterable, Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary path beside ``path`` (same suffix) for the block to write; it replaces
    ``path`` when the block ends, or is removed if the block fails (a full disk leaves the old
    file as it was, not a cut one)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Replaces ``path`` with ``text`` (its directory must exist); returns the path."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return pathlib.Path(path)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any],
                encode: Callable[[Any], str] = json.dumps) -> pathlib.Path:
    """Replaces ``path`` with one ``encode(record)`` line per record."""
    return write_text(path, "".join(encode(r) + "\n" for r in records))
