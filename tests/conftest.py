"""Tests run on the CPU with 8 forced host devices so sharding is exercised for real."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk and shared with the subprocesses tests start (they
# inherit the environment): resume and multi-process tests compile the same steps again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rlhf_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.fail(f"tests need 8 host devices, got {len(devices)}: XLA_FLAGS was set too late")
    return devices


from tests.real_model import smollm2_dir  # noqa: E402,F401  (the session fixture of the real-model tests)
