"""What every benchmark shares: the machine description, thread counts, a compile counter,
the matmul peak, optional peers (torch / transformers / trl), and exporting our params to a
HF checkpoint so a peer runs the same architecture with the same weights."""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.models.hf import export_hf, hf_tensors
from rlhf_jax.models.hf_config import hf_config

NOT_INSTALLED = "not installed (pip install -e '.[bench]')"


# ---------------------------------------------------------------------------------------
# machine, threads, peers


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_peers(*modules: str) -> list[str]:
    """The modules among ``modules`` that cannot be imported (a peer is then skipped)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def peer_threads() -> int:
    """JAX's CPU client runs one intra-op thread per core; peers get as many."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_torch():
    """torch with as many intra-op threads as JAX uses, on the accelerator JAX uses."""
    import torch

    torch.set_num_threads(peer_threads())
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":  # JAX's default f32 matmul precision on GPU rounds through TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    return torch, torch.device(device)


def machine_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads_used": peer_threads(),
            "jax_backend": jax.default_backend(), "jax_device": str(device.device_kind),
            "python": platform.python_version(),
            "versions": {name: version(name) for name in ("jax", "jaxlib", "flax", "optax", "torch",
                                                          "transformers", "trl", "accelerate")},
            "torch_threads": peer_threads(),
            "note": "one JAX device (single-device mesh); torch set to as many intra-op threads as "
                    "JAX's CPU client uses (one per core)"}


@contextlib.contextmanager
def own_heap():
    """Runs a peer as if it had the Python heap to itself: TRL calls ``gc.collect()`` twice
    per PPO iteration, and a full collection walks every tracked object in the process,
    JAX's and ours included. Freezing moves what exists now out of the collector's view."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------------------
# timing and compiles


def single_device_mesh():
    return sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


class CompileCounter:
    """Counts XLA compilations (JAX's backend-compile monitoring event) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self._active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if self._active and event == self.EVENT:
            self.count += 1

    @contextlib.contextmanager
    def counting(self):
        self._active = True
        try:
            yield self
        finally:
            self._active = False


_COUNTER: CompileCounter | None = None


def jit_cache_size(jitted) -> int:
    """Executables a jit object holds. ``_cache_size`` is private JAX: where a JAX version
    lacks it, 0, and only the compile events (:class:`CompileCounter`) count."""
    size = getattr(jitted, "_cache_size", None)
    return size() if callable(size) else 0


def compile_counter() -> CompileCounter:
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CompileCounter()
    return _COUNTER


def time_calls(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = jax.block_until_ready):
    """Seconds of each of ``repeats`` calls of ``fn`` (each waited on with ``sync``)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return times


def take_turns(runners: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Runs each runner once per round, in turn, so every one sees the same machine load (on
    a shared machine the load drifts over minutes). Each runner must wait for its own work.
    Returns (seconds of each call, each call's output), by runner name."""
    times = {name: [] for name in runners}
    outputs = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run_once in runners.items():
            t0 = time.perf_counter()
            outputs[name].append(run_once())
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "n": len(times)}


# ---------------------------------------------------------------------------------------
# peak


def jax_matmul_peak(n: int, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted ``jnp.dot`` of two n x n ``dtype`` matrices (best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    return 2 * n ** 3 / min(time_calls(lambda: dot(a, b), repeats))


def torch_matmul_peak(n: int, repeats: int = 10) -> float:
    torch, device = setup_torch()
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
    sync(a @ b)
    return 2 * n ** 3 / min(time_calls(lambda: a @ b, repeats, sync))


def matmul_peaks(n: int, with_torch: bool) -> dict[str, Any]:
    """The f32 n x n GEMM peak in TFLOP/s of ``jnp.dot`` and (``with_torch``) ``torch.matmul``,
    and the better of the two (``used``): every row of a section is judged against it."""
    jax_peak = jax_matmul_peak(n)
    torch_peak = torch_matmul_peak(n) if with_torch else None
    return {"jax": jax_peak / 1e12, "torch": torch_peak and torch_peak / 1e12,
            "used": max(jax_peak, torch_peak or 0.0) / 1e12, "n": n}


# ---------------------------------------------------------------------------------------
# HF checkpoints of our params


def hf_extras(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields that make the HF model compute what ours does in a benchmark:
    no dropout (ours has none here), special ids inside the vocabulary (pad 0, eos 1)."""
    dropout = ({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if cfg.family == "gpt2"
               else {"attention_dropout": 0.0})
    return {**dropout, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}


def export_lm(params: Any, cfg: ModelConfig, directory: pathlib.Path, **extra) -> pathlib.Path:
    """Our LanguageModel params as a HF causal-LM checkpoint (``extra`` goes into config.json)."""
    export_hf(params, cfg, directory)
    _update_config(directory, {**hf_extras(cfg), **extra})
    return directory


def export_scalar(params: Any, cfg: ModelConfig, directory: pathlib.Path, **extra) -> pathlib.Path:
    """Our ScalarModel params as a HF ``*ForSequenceClassification`` (num_labels 1): the
    backbone as in the LM export and ``score.weight`` from our head. HF's score has no bias,
    so ours must be zero (it is at init)."""
    from safetensors.numpy import save_file

    if np.any(np.asarray(params["head"]["bias"]) != 0):
        raise ValueError("HF sequence-classification heads have no bias; ours must be 0")
    tensors = hf_tensors({"backbone": params["backbone"]}, cfg)
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = np.ascontiguousarray(np.asarray(params["head"]["kernel"]).T)
    config = hf_config(cfg)
    config["architectures"] = [config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
                               .replace("LMHeadModel", "ForSequenceClassification")]
    config.update(num_labels=1, **hf_extras(cfg), **extra)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _update_config(directory: pathlib.Path, extra: dict) -> None:
    if extra:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2, sort_keys=True))


def word_tokenizer(vocab_size: int, pad_id: int = 0, eos_id: int = 1):
    """A HF fast tokenizer whose ids are the tokens ``t0 .. t{V-1}`` (peers need one; the
    benchmarks feed token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{pad_id}", eos_token=f"t{eos_id}",
                                   unk_token="t2", padding_side="left")
