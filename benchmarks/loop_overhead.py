"""Loop overhead (issue 17): the SFT stage's loop against its bare jitted step.

On a model so small that compute is negligible (1 layer, d_model 32, 8 x 32 tokens), the
SFT stage's own pieces (the task's demonstrations through ``SFTBatches``, the jitted
``make_sft_step``, ``stages.loop.train_loop`` with its prefetch thread, logging every
``log_every`` steps to metrics.jsonl and TensorBoard, a checkpoint at the end) against the
same jitted step called in a tight Python loop on one batch already on the device. The
loop's steps/s is the marginal rate ``n / (t(2n) - t(n))`` of two runs of n and 2n steps,
so the fixed costs (the final checkpoint, opening the logger) cancel. Target: >= 80% of
the bare step's steps/s.

    python -m benchmarks.run --only loop       # (opt-in section; ~1 min on 2 CPU cores)
    python -m benchmarks.loop_overhead         # this section alone, JSON on stdout
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

import jax

from benchmarks import common as bench_common
from rlhf_jax import checkpoint, steps
from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig,
                             SFTConfig, TokenizerConfig)
from rlhf_jax.data import SFTBatches, to_global
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.models import LanguageModel
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import train_loop

TARGET_FRACTION = 0.8


@dataclasses.dataclass(frozen=True)
class LoopWorkload:
    model: ModelConfig = ModelConfig(family="llama", vocab_size=168, d_model=32, n_layers=1, n_heads=2,
                                     d_ff=64, max_len=64)
    batch: int = 8
    seq: int = 32
    steps: int = 300  # n: the loop runs n and 2n steps
    log_every: int = 10  # the SFT stage's default
    repeats: int = 3  # best of this many (bare and marginal loop rate each)


def _setup(work: LoopWorkload, workdir: pathlib.Path):
    cfg = Config(name="loop", model=work.model, mesh=MeshConfig(data=-1), tokenizer=TokenizerConfig(kind="task"),
                 sft=SFTConfig(data=DataConfig(train_path="task:demonstrations", val_path=None,
                                               batch_size=work.batch, max_len=work.seq),
                               optim=OptimConfig(learning_rate=1e-3), checkpoint=CheckpointConfig(save_every=10 ** 6),
                               log_every=work.log_every))
    # one device, as every other benchmark (the process may see more: --xla_force_host_platform_device_count)
    env = dataclasses.replace(common.make_env(cfg, workdir, "sft"), mesh=bench_common.single_device_mesh())
    batches = env.batches(SFTBatches, cfg.sft.data.train_path, "sft.data.train_path", cfg.sft.data)
    model = LanguageModel(cfg.model)
    total = 2 * work.steps
    tx = make_optimizer(cfg.sft.optim, total)
    fresh = lambda: steps.create_train_state(model, tx, env.mesh, jax.random.PRNGKey(0))  # noqa: E731
    _, shardings = fresh()
    step = steps.make_sft_step(model, tx, env.mesh, shardings, 1, learning_rate_schedule(cfg.sft.optim, total))
    return env, batches, fresh, step


def bare_steps_per_second(work: LoopWorkload, batches, fresh, step, mesh) -> float:
    state, _ = fresh()
    batch = to_global(batches.get(0), mesh)
    state, metrics = step(state, batch)  # compiles
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(work.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return work.steps / (time.perf_counter() - t0)


def loop_seconds(work: LoopWorkload, env, batches, fresh, step, n: int, run_dir: pathlib.Path) -> float:
    state, _ = fresh()
    ckpts = checkpoint.StageCheckpoints(run_dir / "checkpoints", CheckpointConfig(save_every=10 ** 6))
    logger = MetricsLogger(run_dir, 0, n, "loop", show_progress=False)
    t0 = time.perf_counter()
    train_loop(env, state=state, step_fn=lambda s, b, i: step(s, b), batches=batches, total_steps=n, ckpts=ckpts,
               start_step=0, log_every=work.log_every, eval_every=10 ** 6, evaluate=None, save_every=10 ** 6,
               logger=logger, progress={"loss": "train/loss"})
    seconds = time.perf_counter() - t0
    ckpts.close()
    logger.close()
    return seconds


def run(work: LoopWorkload = LoopWorkload(), log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        env, batches, fresh, step = _setup(work, tmp / "run")
        bare = max(bare_steps_per_second(work, batches, fresh, step, env.mesh) for _ in range(work.repeats))
        loop_seconds(work, env, batches, fresh, step, 20, tmp / "warm")  # the loop's own first-call costs
        rates = []
        for r in range(work.repeats):
            short = loop_seconds(work, env, batches, fresh, step, work.steps, tmp / f"short{r}")
            long = loop_seconds(work, env, batches, fresh, step, 2 * work.steps, tmp / f"long{r}")
            rates.append(work.steps / (long - short))
        loop = max(rates)
    fraction = loop / bare
    log(f"loop overhead: bare step {bare:.0f} steps/s, SFT stage loop {loop:.0f} steps/s ({fraction:.0%}; "
        f"target >= {TARGET_FRACTION:.0%})")
    return {"workload": {**dataclasses.asdict(work), "model": dataclasses.asdict(work.model)},
            "bare_steps_per_s": bare, "loop_steps_per_s": loop, "loop_rates": rates,
            "fraction_of_bare": fraction, "target_fraction": TARGET_FRACTION,
            "met": fraction >= TARGET_FRACTION}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
