"""Tokens/s of our jitted SFT step and the fraction of a measured matmul peak it reaches.

Workload (issue 3 / 9): GPT-2-style, 6 layers, d_model 512, vocab 8192, batch 8 x 256, f32.
Model FLOPs by the MaxText formula (6 * params-matmul FLOPs per token + attention, remat not
counted). The peak is a measured ``jnp.dot`` of large f32 matrices on the same device.

    python -m benchmarks.sft_step [--out benchmarks/results/sft_step.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding, steps
from rlhf_jax.config import MeshConfig, ModelConfig, OptimConfig
from rlhf_jax.models import LanguageModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.types import TokenBatch

MODEL = ModelConfig(family="gpt2", vocab_size=8192, d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_len=256)
BATCH, SEQ = 8, 256


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted f32 ``jnp.dot`` of two n x n matrices (best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def model_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """MaxText: 6 x (matmul params) per token for forward + backward, plus attention
    12 x layers x seq x d (QK^T and AV, forward + backward, causal not discounted)."""
    d, f, v, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    q, kv = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    mlp = (3 if cfg.family == "llama" else 2) * d * f
    matmul_params = L * (d * (q + 2 * kv) + q * d + mlp) + d * v  # + unembedding
    return 6 * matmul_params + 12 * L * seq * q


def sft_tokens_per_second(cfg: ModelConfig = MODEL, batch: int = BATCH, seq: int = SEQ, steps_timed: int = 10):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(learning_rate=1e-4), 1000)
    state, shardings = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
    step = steps.make_sft_step(model, tx, mesh, shardings)
    rng = np.random.default_rng(0)
    data = TokenBatch(tokens=jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32),
                      loss_mask=jnp.ones((batch, seq), jnp.float32), segment_ids=jnp.ones((batch, seq), jnp.int32),
                      positions=jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1)))
    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compiles = step.jitted._cache_size()
    t = time.perf_counter()
    for _ in range(steps_timed):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t) / steps_timed
    assert step.jitted._cache_size() == compiles, "recompiled after warm-up"
    return batch * seq / seconds, seconds, step.jitted._cache_size() - compiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/sft_step.json")
    args = parser.parse_args()
    peak = matmul_peak_flops()
    tokens_per_s, step_s, recompiles = sft_tokens_per_second()
    flops = model_flops_per_token(MODEL, SEQ) * tokens_per_s
    result = {"workload": "sft_step gpt2 6L d512 V8192 8x256 f32", "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind), "machine": platform.processor() or platform.machine(),
              "tokens_per_second": tokens_per_s, "step_seconds": step_s, "model_tflops": flops / 1e12,
              "matmul_peak_tflops": peak / 1e12, "fraction_of_matmul_peak": flops / peak,
              "compiles_after_warmup": recompiles}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
