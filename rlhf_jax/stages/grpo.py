"""GRPO (Shao et al. 2024) on the online loop: ``grpo.group_size`` responses per prompt,
each response's reward normalised within its group as the advantage of all its tokens, the
clipped surrogate plus the k3 KL to the reference in the loss (:func:`losses.grpo_loss`).
No value model. ``grpo.advantage="dr_grpo"`` with ``aggregation="constant"`` is Dr. GRPO."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.config import Config, GRPOConfig
from rlhf_jax.stages.online import CriticFreeMethod, run_online
from rlhf_jax.stages.table import RunOptions


class GRPO(CriticFreeMethod):
    prefix = "grpo"
    cfg: GRPOConfig

    def advantages(self, scores, logp, ref_logp, mask, kl_coef):
        cfg = self.cfg
        groups = scores.reshape(-1, cfg.group_size)
        advantages, metrics = losses.group_advantages(groups, jnp.ones(groups.shape, bool), cfg.advantage, cfg.advantage_eps)
        # the KL is in the loss, not the reward: measured here as every method reports it
        _, kl_metrics = losses.kl_penalized_scores(logp, ref_logp, scores, mask, kl_coef, cfg.kl_estimator)
        return advantages.reshape(-1), kl_metrics["kl_to_ref"], {**metrics, "kl_to_ref": kl_metrics["kl_to_ref"]}

    def loss(self, logp, mb):
        cfg = self.cfg
        return losses.grpo_loss(logp, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.response_mask,
                                cfg.clip_low, cfg.clip_high, cfg.kl_coef, cfg.aggregation)


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    return run_online(cfg, workdir, GRPO(cfg.grpo), "grpo", options)
