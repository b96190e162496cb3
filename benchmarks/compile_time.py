"""Compile seconds against depth, unrolled vs ``ModelConfig.scan_layers`` (issue 17).

For GPT-2-family models of 4 and 32 layers at a small width (d_model 128, so compute is
beside the point), times ``jit(...).lower(...)`` and ``.compile()`` of our SFT step and of
our sampler (prefill + ``while_loop`` decode), each in the layout of its row, the best of
``repeats`` fresh builds (a new model and new jit objects each; no compilation cache). The target:
scanned, 32 layers compile within 1.3x of 4 layers.

    python -m benchmarks.run --only compile      # (opt-in section; ~1-2 min on 2 CPU cores)
    python -m benchmarks.compile_time            # this section alone, JSON on stdout
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from rlhf_jax import sampling, steps
from rlhf_jax.config import ModelConfig, OptimConfig, SamplingConfig
from rlhf_jax.models import LanguageModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.types import TokenBatch

TARGET_RATIO = 1.3  # scanned: compile(32 layers) / compile(4 layers)


@dataclasses.dataclass(frozen=True)
class CompileWorkload:
    model: ModelConfig = ModelConfig(family="gpt2", vocab_size=1024, d_model=128, n_layers=4, n_heads=4,
                                     d_ff=512, max_len=128)
    depths: tuple[int, ...] = (4, 32)
    batch: int = 4
    seq: int = 64
    prompt_len: int = 16
    new_tokens: int = 16
    # best (least) of this many fresh builds per row: on a shared 2-core machine one timing
    # varied 1.3x between back-to-back runs of the same row
    repeats: int = 2


def _timed(jitted, *args) -> dict[str, float]:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def measure(cfg: ModelConfig, work: CompileWorkload) -> dict[str, dict[str, float]]:
    mesh = common.single_device_mesh()
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(), 1000)
    state, shardings = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
    b, t = work.batch, work.seq
    data = TokenBatch(tokens=jnp.zeros((b, t), jnp.int32), loss_mask=jnp.ones((b, t), jnp.float32),
                      segment_ids=jnp.ones((b, t), jnp.int32),
                      positions=jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)))
    sft = steps.make_sft_step(model, tx, mesh, shardings)
    sampler = sampling.make_sampler(model, SamplingConfig(max_new_tokens=work.new_tokens, temperature=0.0),
                                    mesh, shardings.params, eos_id=-1, pad_id=0)
    prompts = jnp.ones((b, work.prompt_len), jnp.int32)
    from rlhf_jax import sharding

    with sharding.activate(mesh):
        return {"sft_step": _timed(sft.jitted, state, data),
                "sampler": _timed(sampler.jitted, state.params, prompts, prompts, jax.random.PRNGKey(1))}


def run(work: CompileWorkload = CompileWorkload(), log=print) -> dict:
    jax.config.update("jax_enable_compilation_cache", False)  # every row compiles from scratch
    rows = []
    for scan in (False, True):
        for depth in work.depths:
            cfg = dataclasses.replace(work.model, n_layers=depth, scan_layers=scan)
            tries = [measure(cfg, work) for _ in range(work.repeats)]
            best = {what: min((t[what] for t in tries), key=lambda x: x["total_s"]) for what in tries[0]}
            row = {"n_layers": depth, "scan_layers": scan, **best,
                   "all_total_s": {what: [t[what]["total_s"] for t in tries] for what in tries[0]}}
            log(f"compile: {depth} layers, scan_layers={scan}: "
                + ", ".join(f"{k} {v['total_s']:.2f} s" for k, v in row.items() if k in ("sft_step", "sampler")))
            rows.append(row)
    lo, hi = min(work.depths), max(work.depths)
    ratios = {}
    for scan in (False, True):
        by_depth = {r["n_layers"]: r for r in rows if r["scan_layers"] == scan}
        for what in ("sft_step", "sampler"):
            ratios[f"{'scanned' if scan else 'unrolled'} {what} {hi}L/{lo}L"] = (
                by_depth[hi][what]["total_s"] / by_depth[lo][what]["total_s"])
    return {"workload": {**dataclasses.asdict(work), "model": dataclasses.asdict(work.model)},
            "rows": rows, "ratios": ratios, "target_ratio_scanned": TARGET_RATIO}


def main() -> None:
    print(json.dumps(run(log=lambda m: print(m, flush=True, file=__import__("sys").stderr)), indent=2))


if __name__ == "__main__":
    main()
