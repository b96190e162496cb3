"""RLOO (Ahmadian et al. 2024) on the online loop: ``rloo.group_size`` responses per prompt;
each response's reward is its score less ``kl_coef`` times its summed KL to the reference,
its advantage that reward less the mean of the others' (the leave-one-out baseline), and
the loss REINFORCE on its summed log-prob (:func:`losses.rloo_loss`). No value model."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.config import Config, RLOOConfig
from rlhf_jax.stages.online import CriticFreeMethod, run_online
from rlhf_jax.stages.table import RunOptions


class RLOO(CriticFreeMethod):
    prefix = "rloo"
    cfg: RLOOConfig

    def advantages(self, scores, logp, ref_logp, mask, kl_coef):
        cfg = self.cfg
        rewards, kl_metrics = losses.kl_penalized_scores(logp, ref_logp, scores, mask, kl_coef, cfg.kl_estimator)
        groups = rewards.reshape(-1, cfg.group_size)
        advantages, metrics = losses.group_advantages(groups, jnp.ones(groups.shape, bool), "rloo")
        advantages = advantages.reshape(-1)
        if cfg.normalize_advantages:
            advantages = losses.whiten(advantages, jnp.ones(advantages.shape, bool))
        return advantages, kl_metrics["kl_to_ref"], {**metrics, **kl_metrics}

    def loss(self, logp, mb):
        return losses.rloo_loss(logp, mb.old_logprobs, mb.advantages, mb.response_mask, self.cfg.clip)


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    return run_online(cfg, workdir, RLOO(cfg.rloo), "rloo", options)
