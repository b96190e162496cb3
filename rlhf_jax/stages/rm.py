"""Stage 2: the reward model, trained on ranked comparisons.

The SFT network with its unembedding replaced by a scalar head (the backbone comes from
the SFT export), the K-wise ranking loss, validation pairwise accuracy each epoch, and at
the end the paper's normalisation: a bias so that demonstrations score mean 0 (and
optionally a gain so their std is 1), applied to the exported head and recorded beside it.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import losses, provenance, steps
from rlhf_jax.parameters import scalar_head_rng
from rlhf_jax.config import Config
from rlhf_jax.data import RankingBatches, SFTBatches, to_global
from rlhf_jax.models import ScalarModel
from rlhf_jax.models.heads import normalize_scalar_head
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.offline import evaluate_preferences, train_offline
from rlhf_jax.stages.table import RunOptions


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

    def make_step(state_shardings):
        return steps.make_rm_step(model, tx, env.mesh, state_shardings, rm_cfg.optim.grad_accum_steps,
                                  learning_rate_schedule(rm_cfg.optim, total_steps))

    def make_evaluate(state_shardings):
        eval_fn = steps.make_rm_eval_step(model, env.mesh, state_shardings.params)
        return lambda s: evaluate_preferences(eval_fn, s.params, val, env.mesh, "rm")

    trained = train_offline(env, rm_cfg, model=model, tx=tx, params=params, total_steps=total_steps,
                            make_step=make_step, make_evaluate=make_evaluate if val is not None else None,
                            train=train, eval_every=rm_cfg.eval_every or max(train.steps_per_epoch, 1),
                            truncated="data/truncated_responses", show_progress=show_progress,
                            stop_after=stop_after)
    if trained is None:
        return None
    state, state_shardings, logger = trained
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


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """The stage table's reward model."""
    return run_rm(cfg, workdir, show_progress=options.show_progress, stop_after=options.stop_after)
