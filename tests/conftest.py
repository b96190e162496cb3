"""Tests run on the CPU with 8 forced host devices so sharding is exercised for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.fail(f"tests need 8 host devices, got {len(devices)}: XLA_FLAGS was set too late")
    return devices
