"""Small configs and data for stage tests: tiny models on a few task examples."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                             OptimConfig, SFTConfig, TokenizerConfig)

# float32 spacing at 1 (2**-23): one rounding is off by at most eps/2 of its value
F32_EPS = float(np.finfo(np.float32).eps)


def f32_rtol(*sums: int, ops: int = 2) -> float:
    """Relative tolerance between two float32 evaluations of one quantity that differ in how
    they add up (one device against a sharded all-reduce, a scan against a loop, blocked
    against whole attention, another formula for the same value).

    A sum of n terms computed in any order is off by at most (n - 1) * eps/2 times the sum of
    its terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
    eq. 4.4), so two orders differ by at most (n - 1) * eps; ``sums`` lists the sizes of the
    sums on the way to the value (their bounds add). ``ops``: the other roundings on the way
    (a product, an exp, a log: at most an eps each, for both sides together). The result is
    relative to the magnitude of the terms, which the tests take from the compared values
    (their terms do not cancel: probabilities, normalised activations, squared norms)."""
    return (sum(n - 1 for n in sums) + ops) * F32_EPS


def forward_sums(cfg: ModelConfig, length: int) -> list[int]:
    """The sums one forward pass of ``cfg`` over ``length`` positions adds up, for
    :func:`f32_rtol`: per layer the two norms (d_model each), the attention scores (head
    dim), their softmax and the weighted values (length each), the output projection and the
    MLP's two matmuls (d_model, d_model, d_ff); then the final norm and the logits (d_model)."""
    d = cfg.d_model
    return [d, cfg.dim_per_head, length, length, d, d, cfg.d_ff, d] * cfg.n_layers + [d, d]


def assert_f32_close(got, want, sums, ops: int = 2, scale: float | None = None, err_msg: str = "") -> None:
    """``got`` equals ``want`` to ``f32_rtol(*sums, ops=ops)`` times ``scale``, the magnitude
    of the compared sums' terms (default: the largest magnitude in ``want``; pass the scale of
    a whole gradient tree where a leaf's terms cancel, e.g. a key bias's, whose gradient is 0
    up to rounding)."""
    want = np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want))) if scale is None else scale
    atol = f32_rtol(*sums, ops=ops) * scale
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=atol, err_msg=err_msg)


TINY_MODEL = ModelConfig(family="llama", vocab_size=168, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_len=64, tie_embeddings=False)


def write_demonstrations(path: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """``n`` correct demonstrations of the embedded task."""
    from rlhf_jax.tasks import generate_prompt, solve

    rng = np.random.default_rng(seed)
    records = []
    while len(records) < n:
        prompt = generate_prompt(rng)
        response = solve(prompt)
        if response:
            records.append({"prompt": prompt, "response": response})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_config(train_path, val_path=None, *, steps=8, batch_size=8, mesh=MeshConfig(data=-1),
                lr=3e-3, save_every=4, dropout=0.0, seed=0, model=TINY_MODEL, accum=1) -> Config:
    return Config(
        name="test", seed=seed, model=model, mesh=mesh, tokenizer=TokenizerConfig(kind="task"),
        sft=SFTConfig(
            data=DataConfig(train_path=str(train_path), val_path=str(val_path) if val_path else None,
                            batch_size=batch_size, max_len=32),
            optim=OptimConfig(learning_rate=lr, grad_accum_steps=accum),
            checkpoint=CheckpointConfig(save_every=save_every, keep=2),
            epochs=1000, max_steps=steps, dropout=dropout, eval_every=steps, log_every=2),
    )


def tree_digest(root: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path: what "nothing changed" compares."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_experiment(cfg: Config, path: pathlib.Path) -> pathlib.Path:
    """An experiment file whose get_config() returns ``cfg`` (frozen dataclass reprs are code)."""
    path.write_text(f"from rlhf_jax.config import *\n\n\ndef get_config():\n    return {cfg!r}\n")
    return path


def write_marker_comparisons(path: pathlib.Path, n: int, seed: int = 0, marker: str = "gold") -> pathlib.Path:
    """Comparisons where a response containing ``marker`` beats one without it; K from 2 to 5,
    responses with (or without) the marker tie among themselves."""
    from rlhf_jax.tasks import generate_prompt

    rng = np.random.default_rng(seed)
    words = ["red", "blue", "cat", "dog", "owl", "fox", "pear", "apple", "3", "5", "7", "a", "b", "c"]
    records = []
    for _ in range(n):
        k = int(rng.integers(2, 6))
        has_marker = rng.permutation([True] + [False] + list(rng.random(k - 2) < 0.5))
        responses, ranks = [], []
        for flag in has_marker:
            body = list(rng.choice(words, size=int(rng.integers(2, 7))))
            if flag:
                body.insert(int(rng.integers(0, len(body) + 1)), marker)
            responses.append(" ".join(body))
            ranks.append(0 if flag else 1)
        records.append({"prompt": generate_prompt(rng), "responses": responses, "ranks": ranks})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rm_config(cfg: Config, train_path, val_path=None, *, steps=8, batch_size=8, lr=3e-3,
              init_from=None, normalize_path=None, normalize_gain=False, k_max=5) -> Config:
    import dataclasses

    from rlhf_jax.config import RMConfig

    return dataclasses.replace(cfg, rm=RMConfig(
        data=DataConfig(train_path=str(train_path), val_path=str(val_path) if val_path else None,
                        batch_size=batch_size, max_len=32),
        optim=OptimConfig(learning_rate=lr), checkpoint=CheckpointConfig(save_every=1000, keep=1),
        k_max=k_max, epochs=1000, max_steps=steps, log_every=5, eval_every=steps, init_from=init_from,
        normalize_path=str(normalize_path) if normalize_path else None, normalize_gain=normalize_gain))


# ---- the CLI in a subprocess ---------------------------------------------------------------

REPO = pathlib.Path(__file__).parents[1]
_MULTIHOST_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def cli_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment (so the compilation cache conftest.py sets up is shared)
    for a single-host CPU child on 8 devices, less the variables named in ``drop``."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in _MULTIHOST_VARIABLES + drop}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    return env


def start_cli(*args: str, env: dict[str, str] | None = None):
    """``python -m rlhf_jax.cli <args>`` in a fresh process; output to a file (not a pipe:
    nobody reads while a test polls), read by :func:`finish_cli`."""
    import subprocess
    import sys
    import tempfile

    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", *args], env=env or cli_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    proc.log = log
    return proc


def finish_cli(proc, timeout: float = 600) -> tuple[int, str]:
    """Waits for a :func:`start_cli` process (killing it past ``timeout``): (exit code, output)."""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.log.seek(0)
    return proc.returncode, proc.log.read()
