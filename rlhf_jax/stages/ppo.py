"""Stage 3: PPO (and PPO-ptx) against the reward model, with a KL penalty to the SFT policy.

PPO's part of the online loop (:mod:`rlhf_jax.stages.online`): a value model beside the
policy (InstructGPT starts it from the RM), KL-shaped per-token rewards and GAE as
experience, and per minibatch a clipped policy step (+ PPO-ptx's pretraining term) and a
clipped value step. The adaptive KL controller is fed the experience's KL.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp

from rlhf_jax import parameters
from rlhf_jax.config import Config, PPOConfig
from rlhf_jax.models import ScalarModel, lora
from rlhf_jax.optim import make_optimizer
from rlhf_jax.policy import RewardFn
from rlhf_jax.ppo_steps import make_experience_fn, make_ppo_update
from rlhf_jax.stages.online import GenerationMetrics, OnlineSetup, policy_state_parts, run_online
from rlhf_jax.stages.table import RunOptions
from rlhf_jax.steps import create_train_state
from rlhf_jax.types import PPOState, TokenBatch


@dataclasses.dataclass
class PPO:
    """PPO for :func:`~rlhf_jax.stages.online.run_online`."""

    cfg: PPOConfig
    prefix: str = "ppo"

    @property
    def ptx_rows(self) -> int:
        return self.cfg.pretrain.batch_size if self.cfg.ptx_coef else 0

    def init(self, setup: OnlineSetup):
        cfg, env = self.cfg, setup.env
        where = setup.where
        # InstructGPT starts the value function from the RM, so it has the RM's architecture
        # (and the policy's adapters, model.lora: an export holds merged weights)
        value_init, value_field = ((cfg.value_init, f"{where}.value_init") if cfg.value_init
                                   else (setup.reward.spec, f"{where}.reward_init") if setup.reward.spec
                                   else (cfg.policy_init, f"{where}.policy_init"))
        value_cfg = parameters.source(value_init, value_field, env.workdir).model
        self.scalar = ScalarModel(dataclasses.replace(value_cfg, lora=env.cfg.model.lora))
        value_params = env.initial_params(self.scalar, value_init, value_field,
                                          rng=parameters.scalar_head_rng(env.cfg.seed))
        self.value_tx = make_optimizer(cfg.value_optim, cfg.iterations * setup.updates_per_iteration)
        value_state, value_sh = create_train_state(self.scalar, self.value_tx, env.mesh, setup.rng, value_params)
        ema, kl_coef = policy_state_parts(setup)
        state = PPOState(policy=setup.policy_state, value=value_state, ema_params=ema, kl_coef=kl_coef)
        policy_sh = setup.policy_shardings
        return state, PPOState(policy=policy_sh, value=value_sh, ema_params=lora.split_trainable(policy_sh.params)[0],
                               kl_coef=kl_coef.sharding)

    def experience(self, setup: OnlineSetup):
        meta = setup.reward.meta
        return make_experience_fn(setup.policy, self.scalar, setup.reward.fn, self.cfg, setup.sampling,
                                  meta.get("reward_offset", 0.0), meta.get("reward_gain", 1.0), setup.env.mesh)

    def update(self, setup: OnlineSetup, state_shardings):
        update = make_ppo_update(setup.policy, self.scalar, setup.policy_tx, self.value_tx, self.cfg, setup.sampling,
                                 setup.env.mesh, state_shardings)
        mesh = setup.env.mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        # plain PPO's update takes rows it never reads: 2 tokens per optimiser step and shard
        no_ptx = TokenBatch(*(jnp.zeros((setup.updates_per_iteration * shards, 2), jnp.int32) for _ in range(4)))

        def run(state, batch, ptx, observed_kl, rng):
            return update(state, batch, no_ptx if ptx is None else ptx, observed_kl, rng)

        return run

    def export_meta(self, state: PPOState) -> dict:
        return {"ptx_coef": self.cfg.ptx_coef, "kl_coef_final": float(state.kl_coef)}


def run_ppo(cfg: Config, workdir: str | pathlib.Path, *, ppo: PPOConfig | None = None, stage: str = "ppo",
            show_progress: bool = True, stop_after: int | None = None, generation_metrics: GenerationMetrics | None = None,
            reward_fn: RewardFn | None = None) -> pathlib.Path | None:
    """Runs PPO (PPO-ptx when ``ppo.ptx_coef`` > 0); returns the policy export (EMA weights).

    ``generation_metrics(generations) -> {name: value}`` adds task metrics (such as a gold
    score) to each held-out evaluation. ``reward_fn(None, samples) -> [B]`` replaces the
    reward (``ppo.reward_init``) by a programmatic, jittable one; the value model then starts
    from ``value_init`` or, if None, the policy's backbone with a fresh head. ``ppo``: this
    run's block (default ``cfg.ppo``; the pipeline sets ``ptx_coef`` per run); ``stage``: its
    directory under ``workdir`` (the pipeline's are ppo, ppo_ptx and ppo_gold).
    """
    options = RunOptions(stage=stage, show_progress=show_progress, stop_after=stop_after,
                         generation_metrics=generation_metrics, reward_fn=reward_fn)
    return run_online(cfg, workdir, PPO(ppo or cfg.ppo), "ppo", options)


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """The stage table's entry: PPO with ``cfg.ppo`` as it is."""
    return run_online(cfg, workdir, PPO(cfg.ppo), "ppo", options)


def run_ptx(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """PPO-ptx: ``cfg.ppo`` with ``ptx_coef = pipeline.ptx_coef``."""
    return run_online(cfg, workdir, PPO(dataclasses.replace(cfg.ppo, ptx_coef=cfg.pipeline.ptx_coef)), "ppo",
                      options)


def run_gold(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """PPO against the embedded task's gold scorer: a perfect reward model."""
    return run_online(cfg, workdir, PPO(dataclasses.replace(cfg.ppo, reward_init="gold")), "ppo", options)
