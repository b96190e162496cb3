"""One command at a time in a run directory.

``<workdir>/.lock`` is held with ``fcntl.flock`` while a command runs. The kernel releases
the lock when its holder exits in any way (``kill -9`` too), so a lock file left behind
never blocks a rerun; the holder's pid and host are written in it for the message a second
command gets. With several JAX processes, process 0 takes it for all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket
from typing import Iterator

from rlhf_jax.config import ConfigError

LOCK_NAME = ".lock"


class RunDirectoryError(ConfigError):
    """The run directory cannot be written, or another command is using it."""


@contextlib.contextmanager
def hold_run_directory(workdir: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Creates ``workdir`` if needed and holds its lock; refuses a directory that cannot be
    written (before anything else is written) or that another live process holds."""
    workdir = pathlib.Path(workdir).absolute()
    path = workdir / LOCK_NAME
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirectoryError(f"--workdir {workdir}: cannot write there ({err.strerror}: {err.filename}); "
                                "choose a writable --workdir") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise RunDirectoryError(
                f"--workdir {workdir} is in use by {holder} (lock {path}); wait for that command to "
                "finish or stop it, or use another --workdir") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
