"""The skeleton every offline stage shares (pretraining, SFT, the RM, DPO): a train state
around the initial params, resume, the run's config, the metrics logger, the one loop
(:func:`rlhf_jax.stages.loop.train_loop`) and its validation; and the exact evaluation of a
preference loss over a validation set (RM and DPO). No maths here."""

from __future__ import annotations

from typing import Any, Callable

import jax

from rlhf_jax import steps
from rlhf_jax.data import to_global
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import train_loop


def train_offline(env: common.StageEnv, stage_cfg: Any, *, model: Any, tx: Any, params: Any, total_steps: int,
                  make_step: Callable[[Any], Callable], make_evaluate: Callable[[Any], Callable] | None,
                  train: Any, eval_every: int, truncated: str, show_progress: bool,
                  stop_after: int | None) -> tuple[Any, Any, MetricsLogger] | None:
    """Trains ``model`` from ``params`` (None: fresh) over ``train`` batches for
    ``total_steps``: ``make_step(state_shardings)`` gives ``step(state, batch) -> (state,
    metrics)``, ``make_evaluate(state_shardings)`` (or None) ``evaluate(state) -> metrics``.
    ``stage_cfg`` gives ``checkpoint`` and ``log_every``; ``truncated`` names the metric that
    counts ``train.num_truncated`` examples at step 0.

    Returns (state, state shardings, the open logger) once every step has run, or None if
    stopped early (checkpointed: a rerun resumes)."""
    state, shardings = steps.create_train_state(model, tx, env.mesh, jax.random.PRNGKey(env.cfg.seed), params)
    ckpts, state, start = common.restore_or_start(env, stage_cfg.checkpoint, state)
    common.write_run_config(env)
    step = make_step(shardings)
    evaluate = make_evaluate(shardings) if make_evaluate is not None else None
    logger = MetricsLogger(env.stage_dir, start, total_steps, env.stage, show_progress)
    if start == 0:  # one step-0 record: what trains (LoRA) and how many examples were cut
        first = common.trainable_summary(state.params, state.opt_state)
        if getattr(train, "num_truncated", 0):
            first[truncated] = train.num_truncated
        if first:
            logger.log(0, first)
    state, finished = train_loop(
        env, state=state, step_fn=lambda state, batch, _: step(state, batch), batches=train,
        total_steps=total_steps, ckpts=ckpts, start_step=start, log_every=stage_cfg.log_every,
        eval_every=eval_every, evaluate=evaluate, save_every=stage_cfg.checkpoint.save_every, logger=logger,
        progress={"loss": "train/loss"}, stop_after=stop_after)
    ckpts.close()
    if not finished:
        logger.close()
        return None
    return state, shardings, logger


def evaluate_preferences(eval_fn: Callable, params: Any, batches: Any, mesh: Any, name: str,
                         prepare: Callable[[Any], Any] = lambda batch: batch) -> dict[str, float]:
    """``val/<name>_loss`` and ``val/<name>_accuracy`` over every comparison of ``batches``,
    exact (sums, then one divide): ``eval_fn`` a
    :func:`~rlhf_jax.steps.make_preference_eval_step` over ``prepare(placed batch)``."""
    sums = None
    for local in batches.eval_batches():
        out = eval_fn(params, prepare(to_global(local, mesh)))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    sums = jax.device_get(sums)
    return {f"val/{name}_loss": float(sums["loss_sum"] / max(sums["prompts"], 1.0)),
            f"val/{name}_accuracy": float(sums["correct"] / max(sums["pairs"], 1.0))}
