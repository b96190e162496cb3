"""Process-wide settings for the host a run executes on.

:func:`keep_freed_memory` makes glibc's ``malloc`` keep freed memory for reuse. XLA's CPU
runtime allocates and frees every step's activations and gradients; with glibc's defaults
those large blocks go back to the kernel when freed, and the next step touches them again
page by page. On the 2-core CPU this project is tested on, a GPT-2 6-layer SFT step
(``benchmarks/sft_step.py``) took 276k page faults and about 0.5 s of system time per
step: 2.18 s a step with the defaults, 1.89 s with the settings below, which bring the
faults to 0. It only takes effect if called before the JAX backend starts its threads
(each thread's malloc arena is fixed when it first allocates); the ``rlhf-jax`` CLI, the
sweep and the benchmarks call it first thing.

The price is that the process's resident memory stays at its peak instead of shrinking
after it: right for a CPU training job, which reaches its peak every step anyway. On a host
with a GPU or TPU the steps' buffers live on the device, so nothing is gained there, while a
large checkpoint read through host memory would keep its peak: it is left alone unless
``JAX_PLATFORMS`` is ``cpu``. Set ``RLHF_JAX_SYSTEM_MALLOC=1`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1  # free memory at the heap top above this goes back to the kernel
_M_MMAP_MAX = -4  # how many blocks may be served by their own mmap (freed with munmap)
_M_ARENA_MAX = -8  # how many malloc arenas the process's threads share
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


# Device files of accelerators JAX would use before the CPU: NVIDIA GPUs, TPUs.
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def _runs_on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def keep_freed_memory() -> bool:
    """Configures glibc's malloc to reuse freed memory instead of returning it to the
    kernel: one arena, no per-block ``mmap``, no trimming of the heap top. Returns whether
    it did: not on other platforms or C libraries, on a host with a GPU or TPU (unless
    ``JAX_PLATFORMS=cpu``), or with ``RLHF_JAX_SYSTEM_MALLOC=1``. Call it before anything
    runs on a JAX device."""
    if os.environ.get("RLHF_JAX_SYSTEM_MALLOC", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    if not _runs_on_cpu():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


def use_compilation_cache(directory: str | os.PathLike) -> str:
    """Turns on JAX's persistent compilation cache in ``directory`` for this process and
    returns the directory in use. Every program is cached, however fast it compiled: a stage
    compiles dozens of small programs (a 20-step pretrain run of the default model on the
    2-core CPU: 17.6 s writing the cache, 11.7 s reading it, 13 entries, 0.5 MB). A
    directory already set (``JAX_COMPILATION_CACHE_DIR``, or an earlier call) is kept: JAX
    opens its cache once per process."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(directory)
