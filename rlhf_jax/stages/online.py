"""The loop every online method runs (PPO, PPO-ptx, RLOO, GRPO): prompts, the policy and its
KL reference (both from ``policy_init``), the reward (a reward model or the gold scorer),
the sampler, then per iteration: sample, score (the method's experience), update (the
method's epochs x minibatches), log; held-out evaluation of the EMA policy, checkpoints,
resume and the export. A method supplies its state, experience and update
(:class:`OnlineMethod`); nothing here does maths.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parameters, provenance, sharding
from rlhf_jax.config import GOLD_REWARD, Config, ConfigError, OnlineConfig, SamplingConfig
from rlhf_jax.data import PromptBatches, TextBatches
from rlhf_jax.evaluation import Generations, PolicyEvaluator, copy_params, summarize
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.models import LanguageModel, ScalarModel, lora
from rlhf_jax.online_steps import make_group_experience, make_group_update
from rlhf_jax.optim import make_optimizer
from rlhf_jax.policy import RewardFn, gold_reward, reward_model_score
from rlhf_jax.sampling import make_sampler
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import count_tokens, train_loop
from rlhf_jax.stages.table import RunOptions
from rlhf_jax.steps import create_train_state
from rlhf_jax.types import PolicyState, TokenBatch, TrainState

GenerationMetrics = Callable[[Generations], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Reward:
    """What scores an episode: ``fn(params, samples) -> [B]`` with its ``params`` (None for a
    programmatic reward), the export's ``meta`` (its normalisation), and the spec and field
    a value model may start from (None: the reward is no model)."""

    fn: RewardFn
    params: Any = None
    meta: dict = dataclasses.field(default_factory=dict)
    spec: str | None = None


def load_reward(env: common.StageEnv, spec: str, field: str) -> Reward:
    """A reward-model export (its own architecture, read from the export: the RM may be
    larger than the policy), or ``"gold"``: the embedded task's gold scorer (one process)."""
    if spec == GOLD_REWARD:
        if jax.process_count() > 1:
            raise ConfigError(f"{field}={spec!r}: the gold scorer runs on one host; use a single process")
        return Reward(gold_reward(env.tokenizer))
    model = ScalarModel(parameters.source(spec, field, env.workdir).model)
    params, source = env.load_params(spec, model, field)
    return Reward(reward_model_score(model), params, source.meta, spec)


@dataclasses.dataclass(frozen=True)
class OnlineSetup:
    """What the loop has built when a method makes its state and steps."""

    env: common.StageEnv
    cfg: OnlineConfig  # the method's block
    where: str  # its dotted name in the config, for errors
    sampling: SamplingConfig
    policy: LanguageModel
    policy_tx: Any  # the policy's optimiser
    policy_state: Any  # a TrainState of the SFT params, with that optimiser
    policy_shardings: Any
    reward: Reward
    rng: jax.Array
    updates_per_iteration: int


class OnlineMethod(Protocol):
    """An online method: its config block, metric prefix, state, experience and update."""

    cfg: OnlineConfig
    prefix: str  # its metrics' names: "ppo/score", "ppo/kl_to_ref", ...
    ptx_rows: int  # pretraining rows per optimiser step (PPO-ptx); 0: none

    def init(self, setup: OnlineSetup) -> tuple[Any, Any]:
        """(state, its shardings), built around ``setup.policy_state``; the state has
        ``policy``, ``ema_params`` and ``kl_coef``."""

    def experience(self, setup: OnlineSetup) -> Callable:
        """Jitted ``(state, ref_params, reward_params, samples) -> (batch, observed_kl, metrics)``."""

    def update(self, setup: OnlineSetup, state_shardings: Any) -> Callable:
        """``(state, batch, ptx, observed_kl, rng) -> (state, metrics)``, jitted; ``ptx``: the
        iteration's pretraining rows (``ptx_rows`` per optimiser step), or None."""

    def export_meta(self, state: Any) -> dict:
        """What its export records beside the stage and the iterations."""


def check_online_config(cfg: OnlineConfig, where: str, mesh, ptx_rows: int) -> int:
    """Returns optimiser steps per iteration; errors name the field."""
    updates = cfg.updates_per_iteration(where)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.minibatch_size % shards:
        raise ConfigError(f"{where}: minibatch_size={cfg.minibatch_size} is not divisible by the "
                          f"{shards} batch shards of the mesh (data x fsdp)")
    if ptx_rows and ptx_rows % shards:
        raise ConfigError(f"{where}: pretrain.batch_size={ptx_rows} is not divisible by the "
                          f"{shards} batch shards of the mesh")
    return updates


def run_online(cfg: Config, workdir: str | pathlib.Path, method: OnlineMethod, where: str,
               options: RunOptions) -> pathlib.Path | None:
    """Runs ``method`` (its block is ``cfg.<where>``, or a variant the pipeline made);
    returns the policy export (EMA weights), or None if stopped early (a rerun resumes)."""
    mcfg, stage = method.cfg, options.stage or where
    env = common.make_env(cfg, workdir, stage)
    # the episodes are sampled with generation.sampling; a programmatic reward replaces reward_init
    inputs = mcfg if options.reward_fn is None else dataclasses.replace(mcfg, reward_init=None)
    if (finished := provenance.begin(env, where, inputs, ("generation.sampling", cfg.generation.sampling))) is not None:
        return finished
    updates = check_online_config(mcfg, where, env.mesh, method.ptx_rows)
    prompts = env.batches(PromptBatches, mcfg.prompts.train_path, f"{where}.prompts.train_path",
                          mcfg.prompts).require_one_batch(f"{where}.prompts.batch_size")
    val_prompts = pretrain_val = ptx = None
    if mcfg.prompts.val_path:
        val_prompts = env.batches(PromptBatches, mcfg.prompts.val_path, f"{where}.prompts.val_path",
                                  dataclasses.replace(mcfg.prompts, shuffle=False))
    if method.ptx_rows:
        ptx = env.batches(TextBatches, mcfg.pretrain.train_path, f"{where}.pretrain.train_path",
                          dataclasses.replace(mcfg.pretrain, batch_size=updates * method.ptx_rows))
    if mcfg.pretrain.val_path:
        pretrain_val = env.batches(TextBatches, mcfg.pretrain.val_path, f"{where}.pretrain.val_path",
                                   dataclasses.replace(mcfg.pretrain, shuffle=False))

    policy = LanguageModel(cfg.model)
    sft_params, _ = env.load_params(mcfg.policy_init, policy, f"{where}.policy_init")
    reward = (Reward(options.reward_fn) if options.reward_fn is not None
              else load_reward(env, mcfg.reward_init, f"{where}.reward_init"))
    policy_tx = make_optimizer(mcfg.policy_optim, mcfg.iterations * updates)
    rng = jax.random.PRNGKey(cfg.seed)
    # LoRA: the policy is the SFT weights (frozen) + fresh adapters, and the KL reference is
    # those weights with the adapters off (lora.base_params), so no second copy is held
    adapters = cfg.model.lora.enabled
    policy_state, policy_sh = create_train_state(policy, policy_tx, env.mesh, rng,
                                                 sft_params if adapters else copy_params(sft_params))
    if adapters:
        sft_params = None  # its buffers are the policy's base now; the train state is donated

    def reference(state) -> Any:
        """The KL reference policy's params: the SFT policy."""
        return lora.base_params(state.policy.params) if adapters else sft_params

    def final_policy(state) -> Any:
        """The policy evaluated and exported: the EMA weights (over the frozen base), or the last."""
        if not mcfg.ema_decay:
            return state.policy.params
        return lora.merge(state.ema_params, lora.split_trainable(state.policy.params)[1])
    sampling = cfg.generation.sampling
    setup = OnlineSetup(env=env, cfg=mcfg, where=where, sampling=sampling, policy=policy, policy_tx=policy_tx,
                        policy_state=policy_state, policy_shardings=policy_sh, reward=reward, rng=rng,
                        updates_per_iteration=updates)
    state, state_sh = method.init(setup)
    ckpts, state, start = common.restore_or_start(env, mcfg.checkpoint, state)
    common.write_run_config(env)

    sampler = make_sampler(policy, sampling, env.mesh, policy_sh.params, env.tokenizer.eos_id, env.tokenizer.pad_id)
    experience, update = method.experience(setup), method.update(setup, state_sh)
    eval_temperature = sampling.temperature if cfg.generation.eval_temperature is None \
        else cfg.generation.eval_temperature
    evaluator = PolicyEvaluator(policy, reward.fn, env.mesh, policy_sh.params, env.tokenizer,
                                dataclasses.replace(sampling, temperature=eval_temperature), cfg.seed,
                                cfg.generation.kl_estimator)
    group = mcfg.group_size

    def evaluate(state) -> dict[str, float]:
        params = final_policy(state)
        metrics = {}
        if val_prompts is not None:
            generations = evaluator.generate(params, reference(state), reward.params, val_prompts)
            metrics.update(summarize(generations, "eval", options.generation_metrics))
        if pretrain_val is not None:
            metrics["eval/pretrain_loss"] = evaluator.pretrain_loss(params, pretrain_val)
        return metrics

    logger = MetricsLogger(env.stage_dir, start, mcfg.iterations, stage, options.show_progress)
    if start == 0:  # one step-0 record: what each trained model of the state trains (LoRA), cut prompts
        first = {}
        for part in dataclasses.fields(state):  # the policy, and PPO's value model
            if isinstance(trained := getattr(state, part.name), TrainState):
                summary = common.trainable_summary(trained.params, trained.opt_state)
                first.update({f"{part.name}/{k}": v for k, v in summary.items()})
        if prompts.num_truncated:  # on_too_long='truncate' cut them: say how many
            first["data/truncated_prompts"] = prompts.num_truncated
        if first:
            logger.log(0, first)
    if start == 0 and (val_prompts is not None or pretrain_val is not None):
        logger.log(0, evaluate(state))  # the SFT policy's numbers, for comparison

    def iteration(state, inputs: tuple[TokenBatch, TokenBatch | None], step: int):
        """One iteration: rollout, scoring, update. Returns device metrics, no host sync
        (unless ``time_phases``)."""
        prompt_batch, ptx_batch = inputs
        iteration_rng = jax.random.fold_in(rng, step)
        clock = _PhaseClock(mcfg.time_phases)
        samples = clock.lap("rollout", sampler(state.policy.params, prompt_batch.tokens, prompt_batch.segment_ids,
                                               jax.random.fold_in(iteration_rng, 0)))
        batch, observed_kl, exp_metrics = clock.lap("scoring", experience(state, reference(state), reward.params,
                                                                          samples))
        state, update_metrics = clock.lap("update", update(state, batch, ptx_batch, observed_kl,
                                                           jax.random.fold_in(iteration_rng, 1)))
        return state, {**exp_metrics, **update_metrics, **clock.metrics()}

    prefix = method.prefix
    state, finished = train_loop(
        env, state=state, step_fn=iteration, batches=_Inputs(prompts, ptx, group), total_steps=mcfg.iterations,
        ckpts=ckpts, start_step=start, log_every=mcfg.log_every, eval_every=mcfg.eval_every, evaluate=evaluate,
        save_every=mcfg.checkpoint.save_every, logger=logger,
        progress={"score": f"{prefix}/score", "kl": f"{prefix}/kl_to_ref"},
        stop_after=options.stop_after, count=lambda inputs: count_tokens(inputs[0]))
    ckpts.close()
    logger.close()
    if not finished:
        return None
    final = final_policy(state)
    common.export_adapter(env, final, mcfg.policy_init)
    return provenance.export(env, final, {"stage": stage, "iterations": mcfg.iterations, **method.export_meta(state)})


class CriticFreeMethod:
    """RLOO's and GRPO's shared part: a :class:`~rlhf_jax.types.PolicyState` (no value
    model) and the group experience and update of :mod:`rlhf_jax.online_steps`. A subclass
    names its ``prefix`` and supplies ``advantages`` and ``loss``
    (:class:`~rlhf_jax.online_steps.CriticFree`)."""

    prefix: str
    ptx_rows = 0

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg

    def init(self, setup: OnlineSetup):
        ema, kl_coef = policy_state_parts(setup)
        shardings = setup.policy_shardings
        return (PolicyState(policy=setup.policy_state, ema_params=ema, kl_coef=kl_coef),
                PolicyState(policy=shardings, ema_params=lora.split_trainable(shardings.params)[0],
                            kl_coef=kl_coef.sharding))

    def experience(self, setup: OnlineSetup) -> Callable:
        meta = setup.reward.meta
        return make_group_experience(self, setup.policy, setup.reward.fn, self.cfg, setup.sampling,
                                     meta.get("reward_offset", 0.0), meta.get("reward_gain", 1.0), setup.env.mesh)

    def update(self, setup: OnlineSetup, state_shardings: Any) -> Callable:
        return make_group_update(self, setup.policy, setup.policy_tx, self.cfg, setup.sampling, setup.env.mesh,
                                 state_shardings)

    def export_meta(self, state) -> dict:
        return {"kl_coef": self.cfg.kl_coef, "group_size": self.cfg.group_size}


def policy_state_parts(setup: OnlineSetup) -> tuple[Any, Any]:
    """(EMA params, beta placed replicated): what every method's state holds beside its policy.
    The EMA covers what trains: with LoRA, the adapters (the base does not move)."""
    return copy_params(lora.split_trainable(setup.policy_state.params)[0]), jax.device_put(jnp.float32(setup.cfg.kl_coef),
                                                                  sharding.replicated(setup.env.mesh))


class _Inputs:
    """An iteration's host batches: its prompts (each ``group`` times, a prompt's copies
    adjacent) and (PPO-ptx) pretraining rows, or None."""

    def __init__(self, prompts, ptx, group: int):
        self.prompts, self.ptx, self.group = prompts, ptx, group

    def get(self, iteration: int) -> tuple[TokenBatch, TokenBatch | None]:
        prompts = self.prompts.get(iteration)
        if self.group > 1:
            prompts = jax.tree.map(lambda x: np.repeat(x, self.group, axis=0), prompts)
        return prompts, None if self.ptx is None else self.ptx.get(iteration)


class _PhaseClock:
    """``time_phases``: each phase's wall time, waiting on the device at its end; off,
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
