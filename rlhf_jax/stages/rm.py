"""Stage 2: the reward model, trained on ranked comparisons.

The SFT network with its unembedding replaced by a scalar head (the backbone comes from
the SFT export), the K-wise ranking loss, validation pairwise accuracy each epoch, and at
the end the paper's normalisation: a bias so that demonstrations score mean 0 (and
optionally a gain so their std is 1), applied to the exported head and recorded beside it.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import losses, provenance, steps
from rlhf_jax.parameters import scalar_head_rng
from rlhf_jax.config import Config
from rlhf_jax.data import RankingBatches, SFTBatches, to_global
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.models import ScalarModel
from rlhf_jax.models.heads import normalize_scalar_head
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import train_loop


def evaluate_rm(eval_fn, params, batches, mesh) -> dict[str, float]:
    sums = None
    for local in batches.eval_batches():
        out = eval_fn(params, to_global(local, mesh))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    sums = jax.device_get(sums)
    return {"val/rm_loss": float(sums["loss_sum"] / max(sums["prompts"], 1.0)),
            "val/rm_accuracy": float(sums["correct"] / max(sums["pairs"], 1.0))}


def demonstration_rewards(env: common.StageEnv, model: ScalarModel, params, param_shardings) -> np.ndarray:
    """The reward of every demonstration in ``rm.normalize_path`` (prompt + response + EOS)."""
    cfg = env.cfg.rm
    demos = env.batches(SFTBatches, cfg.normalize_path, "rm.normalize_path",
                        dataclasses.replace(cfg.data, shuffle=False, packing=False))
    score = steps.make_score_fn(model, env.mesh, param_shardings, right_padded=True)  # unpacked rows
    rewards = []
    for local in demos.eval_batches():
        batch = to_global(local, env.mesh)
        values = multihost_utils.process_allgather(
            score(params, batch.tokens, batch.segment_ids, batch.positions), tiled=True)
        real = multihost_utils.process_allgather(batch.segment_ids, tiled=True).any(axis=1)  # not padding rows
        rewards.append(np.asarray(values)[real])
    return np.concatenate(rewards)


def run_rm(cfg: Config, workdir: str | pathlib.Path, *, show_progress: bool = True,
           stop_after: int | None = None) -> pathlib.Path | None:
    """Trains the reward model; returns the export directory (None if stopped early)."""
    rm_cfg = cfg.rm
    env = common.make_env(cfg, workdir, "rm", rm_cfg.model)
    cfg = env.cfg  # its model is the RM's architecture
    if (finished := provenance.begin(env, "rm", rm_cfg)) is not None:
        return finished
    train = env.batches(RankingBatches, rm_cfg.data.train_path, "rm.data.train_path", rm_cfg.data,
                        k_max=rm_cfg.k_max).require_one_batch("rm.data.batch_size").require_distinct_pairs()
    val = None
    if rm_cfg.data.val_path:
        val = env.batches(RankingBatches, rm_cfg.data.val_path, "rm.data.val_path",
                          dataclasses.replace(rm_cfg.data, shuffle=False), k_max=rm_cfg.k_max)
    if rm_cfg.normalize_path:
        env.data_path(rm_cfg.normalize_path, "rm.normalize_path")  # fail now, not after training
    total_steps = rm_cfg.max_steps or rm_cfg.epochs * train.steps_per_epoch

    model = ScalarModel(cfg.model, dropout_rate=rm_cfg.dropout)
    tx = make_optimizer(rm_cfg.optim, total_steps)
    # a reward model's source as it is; else a fresh (zero) head on a language model's backbone
    params = env.initial_params(model, rm_cfg.init_from, "rm.init_from", rng=scalar_head_rng(cfg.seed))
    state, state_shardings = steps.create_train_state(model, tx, env.mesh, jax.random.PRNGKey(cfg.seed), params)
    ckpts, state, start = common.restore_or_start(env, rm_cfg.checkpoint, state)
    common.write_run_config(env)

    step_fn = steps.make_rm_step(model, tx, env.mesh, state_shardings, rm_cfg.optim.grad_accum_steps,
                                 learning_rate_schedule(rm_cfg.optim, total_steps))
    evaluate = None
    if val is not None:
        eval_fn = steps.make_rm_eval_step(model, env.mesh, state_shardings.params)
        evaluate = lambda s: evaluate_rm(eval_fn, s.params, val, env.mesh)  # noqa: E731
    logger = MetricsLogger(env.stage_dir, start, total_steps, "rm", show_progress)
    if start == 0 and train.num_truncated:
        logger.log(0, {"data/truncated_responses": train.num_truncated})
    if start == 0:
        logger.log(0, common.trainable_summary(state.params, state.opt_state))
    state, finished = train_loop(
        env, state=state, step_fn=lambda state, batch, step: step_fn(state, batch), batches=train, total_steps=total_steps, ckpts=ckpts,
        start_step=start, log_every=rm_cfg.log_every,
        eval_every=rm_cfg.eval_every or max(train.steps_per_epoch, 1), evaluate=evaluate,
        save_every=rm_cfg.checkpoint.save_every, logger=logger, progress={"loss": "train/loss"},
        stop_after=stop_after)
    ckpts.close()
    if not finished:
        logger.close()
        return None

    params, extra = state.params, {"stage": "rm", "reward_offset": 0.0, "reward_gain": 1.0}
    if rm_cfg.normalize_path:
        rewards = demonstration_rewards(env, model, params, state_shardings.params)
        mean, std = losses.normalization_stats(rewards, np.ones(rewards.shape, bool))
        gain = 1.0 / max(float(std), 1e-6) if rm_cfg.normalize_gain else 1.0
        params = normalize_scalar_head(params, float(mean), gain)
        extra.update(reward_offset=float(mean), reward_gain=gain, normalized_on=rm_cfg.normalize_path)
        logger.log(total_steps, {"rm/demonstration_reward_mean_raw": float(mean),
                                 "rm/demonstration_reward_std_raw": float(std)})
    logger.close()
    return provenance.export(env, params, extra)

