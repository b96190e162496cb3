"""The shared train loop: prefetched batches, metrics read one step late, saves only after a
step's metrics are checked."""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import CheckpointConfig, MeshConfig
from rlhf_jax.logging import MetricsLogger, read_metrics
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import NonFiniteError, Prefetcher, train_loop
from rlhf_jax.types import TokenBatch
from tests.helpers import tiny_config


def test_prefetcher_yields_every_step_in_order_and_raises_an_error_at_its_step():
    seen = []
    with Prefetcher(lambda step: step * 10, lambda x: x + 1, 2, 6) as ahead:
        for step, local, placed in ahead:
            seen.append((step, local, placed))
    assert seen == [(2, 20, 21), (3, 30, 31), (4, 40, 41), (5, 50, 51)]

    def get(step):
        if step == 3:
            raise KeyError("row 3 is bad")
        return step

    got = []
    with pytest.raises(KeyError, match="row 3 is bad"):
        with Prefetcher(get, lambda x: x, 0, 10) as ahead:
            for step, _, _ in ahead:
                got.append(step)
    assert got == [0, 1, 2]


def test_leaving_the_prefetcher_early_stops_its_thread():
    with Prefetcher(lambda step: step, lambda x: x, 0, 1000, depth=2) as ahead:
        for step, _, _ in ahead:
            if step == 1:
                break
    assert not any(t.name == "rlhf_jax-prefetch" and t.is_alive() for t in threading.enumerate())


class _Rows:
    """Host batches whose tokens are the step number (a pure function of the step)."""

    def get(self, step: int) -> TokenBatch:
        ones = np.ones((8, 4), np.int32)
        return TokenBatch(tokens=ones * step, loss_mask=ones.astype(np.float32), segment_ids=ones, positions=ones)


def _loop(tmp_path, total, *, log_every=1, save_every=100, nan_at=None, record=None):
    cfg = dataclasses.replace(tiny_config("unused.jsonl"), mesh=MeshConfig(data=-1))
    env = common.make_env(cfg, tmp_path / "run", "loop")
    dispatched = []

    @jax.jit
    def step(state, batch):
        loss = jnp.mean(batch.tokens.astype(jnp.float32))
        loss = jnp.where(loss == nan_at, jnp.nan, loss) if nan_at is not None else loss
        return {"count": state["count"] + 1}, {"train/loss": loss}

    def step_fn(state, batch, n):
        dispatched.append(n)
        return step(state, batch)

    logger = MetricsLogger(env.stage_dir, 0, total, "loop", False)
    if record is not None:  # which steps had been dispatched when each step's metrics were read
        log = logger.log
        logger.log = lambda done, metrics: (record.append((done, list(dispatched))), log(done, metrics))[1]
    ckpts = checkpoint.StageCheckpoints(env.stage_dir / "checkpoints", CheckpointConfig(keep=5))
    state = {"count": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(env.mesh))}
    try:
        return train_loop(env, state=state, step_fn=step_fn, batches=_Rows(), total_steps=total, ckpts=ckpts,
                          start_step=0, log_every=log_every, eval_every=1000, evaluate=None,
                          save_every=save_every, logger=logger, progress={"loss": "train/loss"}), env, ckpts
    finally:
        ckpts.close()
        logger.close()


def test_metrics_are_read_after_the_next_step_is_dispatched(tmp_path):
    record = []
    (state, finished), env, _ = _loop(tmp_path, 6, save_every=3, record=record)
    assert finished and int(state["count"]) == 6
    read_after = {done: dispatched[-1] for done, dispatched in record}
    # steps 1, 2, 4, 5 (log points) are read once the next step is dispatched (0-based: step
    # ``done`` was dispatched as ``done - 1``); 3 and 6 are save points, read before saving
    assert read_after == {1: 1, 2: 2, 3: 2, 4: 4, 5: 5, 6: 5}
    metrics = read_metrics(env.stage_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["train/loss"] for m in metrics] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # batches in step order
    assert all(m["perf/steps_per_second"] > 0 and m["perf/tokens_per_second"] > 0 for m in metrics)


def test_a_nan_stops_the_loop_and_no_checkpoint_holds_it(tmp_path):
    # step 5 (batch 4) is NaN, read one step late; the save at 6 must not happen
    with pytest.raises(NonFiniteError, match="step 5: train/loss is nan"):
        _loop(tmp_path, 8, save_every=3, nan_at=4.0)
    assert checkpoint.finished_steps(tmp_path / "run" / "loop" / "checkpoints") == [3]
