"""host.keep_freed_memory: freed memory is reused without page faults, and the opt-out works."""

import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB block with malloc (as XLA's CPU runtime does), then
# counts the page faults of doing it again: with glibc's defaults the block is mmapped and
# unmapped each time (16k faults of 4 KiB), with freed memory kept it is reused (no faults).
_PROBE = """
import ctypes, resource
from rlhf_jax.host import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def touch_and_free(size=64 << 20):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_and_free()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_value: str | None) -> tuple[bool, int]:
    import os

    env = dict(os.environ)
    env.pop("RLHF_JAX_SYSTEM_MALLOC", None)
    if env_value is not None:
        env["RLHF_JAX_SYSTEM_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_reuses_freed_blocks_and_can_be_turned_off():
    kept, faults = _probe(None)
    assert kept
    assert faults < 1000, faults  # a 64 MiB block is 16384 pages
    default_kept, default_faults = _probe("1")
    assert not default_kept
    assert default_faults > 10_000, default_faults


def test_keep_freed_memory_leaves_accelerator_hosts_alone(monkeypatch):
    from rlhf_jax import host

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host._runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host._runs_on_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(host.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert not host._runs_on_cpu()
    assert not host.keep_freed_memory()
    monkeypatch.setattr(host.glob, "glob", lambda pattern: [])
    assert host._runs_on_cpu()
