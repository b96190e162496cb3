"""Files written whole or not at all: the text goes to a temporary file beside the target,
which then replaces it (``os.replace`` is atomic on POSIX), so a reader or a process killed
midway never sees half a file. The temporary name is unique, so two writers never share it."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterable


def replace_file(path: str | os.PathLike, write: Callable[[pathlib.Path], Any]) -> pathlib.Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path``
    (its directory must exist). The file is readable as an ordinary one: 0644, not the 0600
    of a temporary file. Returns the path."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        os.chmod(tmp, 0o644)  # these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Replaces ``path`` with ``text`` (its directory must exist); returns the path."""
    return replace_file(path, lambda tmp: tmp.write_text(text))


def write_jsonl(path: str | os.PathLike, records: Iterable[Any],
                encode: Callable[[Any], str] = json.dumps) -> pathlib.Path:
    """Replaces ``path`` with one ``encode(record)`` line per record."""
    return write_text(path, "".join(encode(r) + "\n" for r in records))
