"""Stage 3: PPO (and PPO-ptx) against the reward model, with a KL penalty to the SFT policy.

Each iteration: sample ``prompts.batch_size`` episodes from the policy (rollout), score them
(reference log-probs, values, reward model, KL-shaped rewards, GAE), then update policy and
value networks over minibatches (one jitted call). The loop times the three phases, logs,
evaluates the EMA policy on held-out prompts, checkpoints, and exports the EMA policy.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax import parameters, provenance, sharding
from rlhf_jax.config import Config, ConfigError, PPOConfig
from rlhf_jax.data import PromptBatches, TextBatches
from rlhf_jax.evaluation import Generations, PolicyEvaluator, copy_params, summarize
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.models import LanguageModel, ScalarModel, lora
from rlhf_jax.optim import make_optimizer
from rlhf_jax.policy import RewardFn, reward_model_score
from rlhf_jax.ppo_steps import make_experience_fn, make_ppo_update
from rlhf_jax.sampling import make_sampler
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import count_tokens, train_loop
from rlhf_jax.steps import create_train_state
from rlhf_jax.types import PPOState, TokenBatch

GenerationMetrics = Callable[[Generations], dict[str, float]]


def check_ppo_config(ppo: PPOConfig, mesh) -> int:
    """Returns optimiser steps per iteration; errors name the field."""
    field = "ppo"
    if ppo.prompts.batch_size % ppo.minibatch_size:
        raise ConfigError(f"{field}: prompts.batch_size={ppo.prompts.batch_size} is not a multiple of "
                          f"minibatch_size={ppo.minibatch_size}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if ppo.minibatch_size % shards:
        raise ConfigError(f"{field}: minibatch_size={ppo.minibatch_size} is not divisible by the "
                          f"{shards} batch shards of the mesh (data x fsdp)")
    if ppo.ptx_coef and ppo.pretrain.batch_size % shards:
        raise ConfigError(f"{field}: pretrain.batch_size={ppo.pretrain.batch_size} is not divisible by the "
                          f"{shards} batch shards of the mesh")
    return ppo.epochs * ppo.prompts.batch_size // ppo.minibatch_size


def run_ppo(cfg: Config, workdir: str | pathlib.Path, *, ppo: PPOConfig | None = None, stage: str = "ppo",
            show_progress: bool = True, stop_after: int | None = None, generation_metrics: GenerationMetrics | None = None,
            reward_fn: RewardFn | None = None) -> pathlib.Path | None:
    """Runs PPO (PPO-ptx when ``ppo.ptx_coef`` > 0); returns the policy export (EMA weights).

    ``generation_metrics(generations) -> {name: value}`` adds task metrics (such as a gold
    score) to each held-out evaluation. ``reward_fn(None, samples) -> [B]`` replaces the
    reward model by a programmatic, jittable reward; the value model then starts from
    ``value_init`` or, if None, the policy's backbone with a fresh head. ``ppo``: this run's
    block (default ``cfg.ppo``; the pipeline sets ``ptx_coef`` per run); ``stage``: its
    directory under ``workdir`` (the pipeline's are ppo, ppo_ptx and ppo_gold).
    """
    ppo = ppo or cfg.ppo
    env = common.make_env(cfg, workdir, stage)
    # a programmatic reward replaces the reward model: ppo.reward_init is not read then
    inputs = ppo if reward_fn is None else dataclasses.replace(ppo, reward_init=None)
    if (finished := provenance.begin(env, "ppo", inputs)) is not None:
        return finished
    updates_per_iteration = check_ppo_config(ppo, env.mesh)
    prompts = env.batches(PromptBatches, ppo.prompts.train_path, "ppo.prompts.train_path",
                          ppo.prompts).require_one_batch("ppo.prompts.batch_size")
    val_prompts = None
    if ppo.prompts.val_path:
        val_prompts = env.batches(PromptBatches, ppo.prompts.val_path, "ppo.prompts.val_path",
                                  dataclasses.replace(ppo.prompts, shuffle=False))
    ptx = None
    if ppo.ptx_coef:
        ptx = env.batches(TextBatches, ppo.pretrain.train_path, "ppo.pretrain.train_path",
                          dataclasses.replace(ppo.pretrain, batch_size=updates_per_iteration * ppo.pretrain.batch_size))
    pretrain_val = None
    if ppo.pretrain.val_path:
        pretrain_val = env.batches(TextBatches, ppo.pretrain.val_path, "ppo.pretrain.val_path",
                                   dataclasses.replace(ppo.pretrain, shuffle=False))

    policy = LanguageModel(cfg.model)
    sft_params, _ = env.load_params(ppo.policy_init, policy, "ppo.policy_init")
    reward_params, reward_meta = None, {}
    if reward_fn is None:
        # the RM may be larger than the policy (rm.model): its export says what it is
        reward_model = ScalarModel(parameters.source(ppo.reward_init, "ppo.reward_init", env.workdir).model)
        reward_params, reward_source = env.load_params(ppo.reward_init, reward_model, "ppo.reward_init")
        reward_meta = reward_source.meta
        reward_fn = reward_model_score(reward_model)
    value_init, value_field = ((ppo.value_init, "ppo.value_init") if ppo.value_init
                               else (ppo.reward_init, "ppo.reward_init") if reward_params is not None
                               else (ppo.policy_init, "ppo.policy_init"))
    # InstructGPT starts the value function from the RM, so it has the RM's architecture
    # (and the policy's adapters, model.lora: an export holds merged weights)
    value_cfg = dataclasses.replace(parameters.source(value_init, value_field, env.workdir).model, lora=cfg.model.lora)
    scalar = ScalarModel(value_cfg)
    value_params = env.initial_params(scalar, value_init, value_field, rng=parameters.scalar_head_rng(cfg.seed))
    policy_tx = make_optimizer(ppo.policy_optim, ppo.iterations * updates_per_iteration)
    value_tx = make_optimizer(ppo.value_optim, ppo.iterations * updates_per_iteration)
    rng = jax.random.PRNGKey(cfg.seed)
    # LoRA: the policy is the SFT weights (frozen) + fresh adapters, and the KL reference is
    # those weights with the adapters off (lora.base_params), so no second copy is held
    adapters = cfg.model.lora.enabled
    policy_state, policy_sh = create_train_state(policy, policy_tx, env.mesh, rng,
                                                 sft_params if adapters else copy_params(sft_params))
    if adapters:
        sft_params = None  # its buffers are the policy's base now; the train state is donated
    value_state, value_sh = create_train_state(scalar, value_tx, env.mesh, rng, value_params)
    replicated = sharding.replicated(env.mesh)
    # the EMA covers what trains: with LoRA the adapters (the base does not move)
    state = PPOState(policy=policy_state, value=value_state,
                     ema_params=copy_params(lora.split_trainable(policy_state.params)[0]),
                     kl_coef=jax.device_put(jnp.float32(ppo.kl_coef), replicated))
    state_sh = PPOState(policy=policy_sh, value=value_sh, ema_params=lora.split_trainable(policy_sh.params)[0],
                        kl_coef=replicated)

    def reference(state: PPOState):
        """The KL reference policy's params: the SFT policy."""
        return lora.base_params(state.policy.params) if adapters else sft_params

    def final_policy(state: PPOState):
        """The policy evaluated and exported: the EMA weights (over the frozen base), or the last."""
        if not ppo.ema_decay:
            return state.policy.params
        return lora.merge(state.ema_params, lora.split_trainable(state.policy.params)[1])

    ckpts, state, start = common.restore_or_start(env, ppo.checkpoint, state)
    common.write_run_config(env)

    sampler = make_sampler(policy, ppo.sampling, env.mesh, policy_sh.params, env.tokenizer.eos_id,
                           env.tokenizer.pad_id)
    experience = make_experience_fn(
        policy, scalar, reward_fn, ppo, reward_meta.get("reward_offset", 0.0), reward_meta.get("reward_gain", 1.0),
        env.mesh)
    update = make_ppo_update(policy, scalar, policy_tx, value_tx, ppo, env.mesh, state_sh)
    eval_temperature = ppo.sampling.temperature if ppo.eval_temperature is None else ppo.eval_temperature
    evaluator = PolicyEvaluator(policy, reward_fn, env.mesh, policy_sh.params, env.tokenizer,
                                dataclasses.replace(ppo.sampling, temperature=eval_temperature), cfg.seed,
                                ppo.kl_estimator)
    shards = env.mesh.shape["data"] * env.mesh.shape["fsdp"]
    no_ptx = TokenBatch(*(jnp.zeros((updates_per_iteration * shards, 2), jnp.int32) for _ in range(4)))

    def evaluate(state: PPOState) -> dict[str, float]:
        params = final_policy(state)
        metrics = {}
        if val_prompts is not None:
            generations = evaluator.generate(params, reference(state), reward_params, val_prompts)
            metrics.update(summarize(generations, "eval", generation_metrics))
        if pretrain_val is not None:
            metrics["eval/pretrain_loss"] = evaluator.pretrain_loss(params, pretrain_val)
        return metrics

    logger = MetricsLogger(env.stage_dir, start, ppo.iterations, stage, show_progress)
    if start == 0 and prompts.num_truncated:  # on_too_long='truncate' cut them: say how many
        logger.log(0, {"data/truncated_prompts": prompts.num_truncated})
    if start == 0:
        for name, trained in (("policy", state.policy), ("value", state.value)):
            summary = common.trainable_summary(trained.params, trained.opt_state)
            logger.log(0, {f"{name}/{k}": v for k, v in summary.items()})
    if start == 0 and (val_prompts is not None or pretrain_val is not None):
        logger.log(0, evaluate(state))  # the SFT policy's numbers, for comparison

    def iteration(state: PPOState, inputs: tuple[TokenBatch, TokenBatch | None], step: int):
        """One PPO iteration: rollout, scoring, update. Returns device metrics, no host sync
        (unless ``ppo.time_phases``)."""
        prompt_batch, ptx_batch = inputs
        iteration_rng = jax.random.fold_in(rng, step)
        clock = _PhaseClock(ppo.time_phases)
        samples = clock.lap("rollout", sampler(state.policy.params, prompt_batch.tokens, prompt_batch.segment_ids,
                                               jax.random.fold_in(iteration_rng, 0)))
        rollout, exp_metrics = clock.lap("scoring", experience(
            state.policy.params, reference(state), state.value.params, reward_params, samples, state.kl_coef))
        state, update_metrics = clock.lap("update", update(
            state, rollout, no_ptx if ptx_batch is None else ptx_batch, exp_metrics["ppo/kl_to_ref"],
            jax.random.fold_in(iteration_rng, 1)))
        return state, {**exp_metrics, **update_metrics, **clock.metrics()}

    state, finished = train_loop(
        env, state=state, step_fn=iteration, batches=_PPOInputs(prompts, ptx), total_steps=ppo.iterations,
        ckpts=ckpts, start_step=start, log_every=ppo.log_every, eval_every=ppo.eval_every, evaluate=evaluate,
        save_every=ppo.checkpoint.save_every, logger=logger, progress={"score": "ppo/score", "kl": "ppo/kl_to_ref"},
        stop_after=stop_after, count=lambda inputs: count_tokens(inputs[0]))
    ckpts.close()
    logger.close()
    if not finished:
        return None
    final = final_policy(state)
    common.export_adapter(env, final, ppo.policy_init)
    return provenance.export(env, final, {"stage": stage, "iterations": ppo.iterations, "ptx_coef": ppo.ptx_coef,
                                          "kl_coef_final": float(state.kl_coef)})


class _PPOInputs:
    """An iteration's host batches: its prompts and (PPO-ptx) pretraining rows, or None."""

    def __init__(self, prompts, ptx):
        self.prompts, self.ptx = prompts, ptx

    def get(self, iteration: int) -> tuple[TokenBatch, TokenBatch | None]:
        return self.prompts.get(iteration), None if self.ptx is None else self.ptx.get(iteration)


class _PhaseClock:
    """``ppo.time_phases``: each phase's wall time, waiting on the device at its end; off,
    ``lap`` passes values through untouched (nothing waits)."""

    def __init__(self, enabled: bool):
        self.enabled, self._times, self._last = enabled, {}, time.perf_counter()

    def lap(self, phase: str, value):
        if self.enabled:
            value = jax.block_until_ready(value)
            now = time.perf_counter()
            self._times[f"time/{phase}_s"], self._last = now - self._last, now
        return value

    def metrics(self) -> dict[str, float]:
        if self._times:
            self._times["time/iteration_s"] = sum(self._times.values())
        return self._times
