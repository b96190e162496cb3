"""What a command prints when it fails for a reason outside the program: one line, naming
the file, the field or the step, never a traceback (a traceback is left for bugs).

:func:`one_line` reads an exception and its causes: a full disk (the error may arrive
wrapped by Orbax or TensorStore, with only its text left), a read-only file system, or a
refusal of ours (``ValueError`` subclasses such as ``ConfigError``, ``DataError``,
``CheckpointError``; ``FloatingPointError`` for a NaN stop).
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator

# errno -> what the user can do about it (the run resumes from its last checkpoint)
_FILE_SYSTEM = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space (the disk quota is used up)",
    errno.EROFS: "make it writable",
}
# Orbax and TensorStore re-raise a failed write as their own error, with the OS's text inside
_TEXTS = {os.strerror(code): code for code in _FILE_SYSTEM}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        for inner in getattr(err, "exceptions", ()):  # an ExceptionGroup (asyncio, Orbax)
            yield from _chain(inner)
        err = err.__cause__ or err.__context__


def _flat(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def file_system_failure(err: BaseException) -> str | None:
    """The one-line account of a full disk (or quota, or read-only file system) anywhere in
    ``err``'s chain, None if there is none."""
    for link in _chain(err):
        code = getattr(link, "errno", None) if isinstance(link, OSError) else None
        if code in _FILE_SYSTEM:
            where = f" writing {link.filename}" if link.filename else ""
            return (f"{os.strerror(code).lower()}{where}; {_FILE_SYSTEM[code]} and rerun the same command "
                    "(it resumes from the last finished checkpoint)")
        for text, code in _TEXTS.items():
            if text in str(link):
                return (f"{text.lower()} ({_flat(str(link), 300)}); {_FILE_SYSTEM[code]} and rerun the "
                        "same command (it resumes from the last finished checkpoint)")
    return None


def one_line(err: BaseException) -> str | None:
    """What to print for ``err`` (without the ``rlhf-jax <command>: error:`` prefix), or None
    for an error that is a bug and keeps its traceback."""
    disk = file_system_failure(err)
    if disk is not None:
        return disk
    if isinstance(err, (ValueError, FloatingPointError)):
        return _flat(str(err), 2000)
    return None


def _reported_elsewhere(err: BaseException | None) -> bool:
    """A background thread's failure the main thread raises and reports itself: a full disk
    under an Orbax save, or TensorStore's callbacks outliving the event loop of the Orbax save
    that failed (they raise "Event loop is closed")."""
    if err is None:
        return False
    return file_system_failure(err) is not None or (isinstance(err, RuntimeError) and
                                                   str(err) == "Event loop is closed")


class _BackgroundFailureFilter:
    """Drops the ERROR records (each with its thread's traceback) that Orbax's threads (through
    absl) and asyncio log for a write that failed for lack of space: the save's failure
    reaches the main thread (``wait_until_finished`` raises it), which says it in one line."""

    def filter(self, record) -> bool:
        if record.levelno < 40:
            return True
        err = record.exc_info[1] if record.exc_info else None
        return not (_reported_elsewhere(err) or file_system_failure(RuntimeError(record.getMessage())))


def quiet_background_failures() -> Callable[[], None]:
    """For the command line: a full disk under a checkpoint is one line, not the pages of
    tracebacks Orbax's and TensorStore's threads print while it unwinds, before and after the
    main thread has raised it (see :class:`_BackgroundFailureFilter`; TensorStore's callbacks
    print through ``sys.unraisablehook``). Everything else is printed as before. Installed
    once per process; returns a function that takes it out again (for tests)."""
    import logging
    import sys

    global _installed
    if _installed is not None:
        return _installed
    loggers, quiet = [logging.getLogger(name) for name in ("absl", "asyncio")], _BackgroundFailureFilter()
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not _reported_elsewhere(value):
            previous(kind, value, tb)

    def unraisablehook(unraisable):
        if not _reported_elsewhere(unraisable.exc_value):
            previous_unraisable(unraisable)

    def remove() -> None:
        global _installed
        for logger in loggers:
            logger.removeFilter(quiet)
        sys.excepthook, sys.unraisablehook = previous, previous_unraisable
        _installed = None

    for logger in loggers:
        logger.addFilter(quiet)
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    _installed = remove
    return remove


_installed: Callable[[], None] | None = None
