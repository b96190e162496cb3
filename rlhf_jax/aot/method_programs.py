"""The programs of the methods after the reward model beside PPO (``aot/programs.py``): DPO,
RLOO and GRPO, and best-of-n, each built by its stage's own builders with abstract inputs."""

from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax import sharding, steps
from rlhf_jax.aot.programs import (SCHEDULE_STEPS, Program, abstract_params, abstract_train_state, batch_struct,
                                   evaluator_programs, online_parts, ranking_batch, replicated_struct,
                                   reward_model_of, rng_struct, samples_struct)
from rlhf_jax.config import Config
from rlhf_jax.evaluation import PolicyEvaluator
from rlhf_jax.models import LanguageModel, lora
from rlhf_jax.online_steps import make_group_experience, make_group_update, takes_sampler_logprobs
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.policy import reward_model_score
from rlhf_jax.stages.dpo import reference_is_base
from rlhf_jax.stages.grpo import GRPO
from rlhf_jax.stages.online import check_online_config
from rlhf_jax.stages.rloo import RLOO
from rlhf_jax.types import GroupRollout, PolicyState

CRITIC_FREE = {"rloo": RLOO, "grpo": GRPO}


def dpo_programs(cfg: Config, mesh: Mesh) -> list[Program]:
    """DPO (``stages/dpo.py``): the train step (the state donated) on the comparisons with the
    reference's log-probs beside them, the validation step, and the reference's log-probs
    (with LoRA and no ``dpo.reference_init``: the policy's base, adapters off)."""
    d = cfg.dpo
    model = LanguageModel(cfg.model, dropout_rate=d.dropout)
    tx = make_optimizer(d.optim, SCHEDULE_STEPS)
    state, state_sh = abstract_train_state(model, tx, mesh, cfg.seed)
    if reference_is_base(cfg):
        ref_params, ref_sh = lora.base_params(state.params), lora.base_params(state_sh.params)
    else:
        ref_params, ref_sh = abstract_params(LanguageModel(cfg.model), mesh)
    step = steps.make_dpo_step(model, tx, mesh, state_sh, beta=d.beta, kind=d.kind,
                               label_smoothing=d.label_smoothing, grad_accum_steps=d.optim.grad_accum_steps,
                               learning_rate=learning_rate_schedule(d.optim, SCHEDULE_STEPS))
    evaluate = steps.make_dpo_eval_step(model, mesh, state_sh.params, beta=d.beta, kind=d.kind,
                                        label_smoothing=d.label_smoothing)
    reference = steps.make_ranking_logprobs_fn(LanguageModel(cfg.model), mesh, ref_sh)
    b, k, t = d.data.batch_size, d.k_max, d.data.max_len
    ranking = ranking_batch(mesh, b, k, t)
    batch = (ranking, batch_struct(mesh, (b, k), jnp.float32))  # the reference's log-probs [B, K]
    micro = b // d.optim.grad_accum_steps
    return [Program("dpo", "train_step", step.jitted, (state, batch), state,
                    [(cfg.model, micro * k, t, True, True)], trainable=lora.split_trainable(state.params)[0],
                    donates=True),
            Program("dpo", "eval_step", evaluate.jitted, (state.params, batch), state.params,
                    [(cfg.model, b * k, t, False, True)]),
            Program("dpo", "reference_logprobs", reference.jitted, (ref_params, ranking), ref_params,
                    [(cfg.model, b * k, t, False, True)])]


def critic_free_programs(cfg: Config, mesh: Mesh, stage: str) -> list[Program]:
    """RLOO or GRPO (``stage``; ``stages/online.py`` with its ``CriticFreeMethod``): the
    sampler on each prompt's ``group_size`` copies, the group experience, the group update
    (the state donated) and the held-out evaluation's programs."""
    method = CRITIC_FREE[stage](getattr(cfg, stage))
    online, sampling = method.cfg, cfg.generation.sampling
    check_online_config(online, stage, mesh, method.ptx_rows)
    parts = online_parts(cfg, stage, online, mesh)
    policy_state = parts.state
    # CriticFreeMethod.init: the EMA of what trains, beta replicated
    state = PolicyState(policy=policy_state, ema_params=lora.split_trainable(policy_state.params)[0],
                        kl_coef=replicated_struct(mesh))
    state_sh = PolicyState(policy=parts.shardings, ema_params=lora.split_trainable(parts.shardings.params)[0],
                           kl_coef=sharding.replicated(mesh))
    experience = make_group_experience(method, parts.policy, reward_model_score(parts.reward_model), online,
                                       sampling, 0.0, 1.0, mesh)
    update = make_group_update(method, parts.policy, parts.policy_tx, online, sampling, mesh, state_sh)
    rows, p, n = online.episodes, online.prompts.max_len, sampling.max_new_tokens
    length = p + n
    rollout = GroupRollout(**{f: batch_struct(mesh, (rows, length)) for f in ("tokens", "segment_ids", "positions")},
                           **{f: batch_struct(mesh, (rows, n), jnp.float32)
                              for f in ("response_mask", "old_logprobs", "ref_logprobs")},
                           advantages=batch_struct(mesh, (rows,), jnp.float32))
    logits_passes = 1 if takes_sampler_logprobs(online, sampling) else 2
    return [
        parts.sampler,
        Program(stage, "experience", experience.jitted,
                (state, parts.reference, parts.reward_params, samples_struct(mesh, rows, p, n)),
                (policy_state.params, parts.reference, parts.reward_params),
                [(cfg.model, rows, length, False, True)] * logits_passes
                + [(parts.reward_cfg, rows, length, False, False)]),
        Program(stage, "update", update.jitted, (state, rollout, None, replicated_struct(mesh), rng_struct(mesh)),
                state, [(cfg.model, online.minibatch_size, length, True, True)],
                trainable=lora.split_trainable(policy_state.params)[0], donates=True),
        *parts.evaluation]


def best_of_n_programs(cfg: Config, mesh: Mesh) -> list[Program]:
    """Best-of-n (``stages/best_of_n.py``): its evaluator's sampler on
    ``generation.prompts.batch_size`` held-out prompts, the reward model's score, and (when it
    samples) the KL of the policy to itself that ``PolicyEvaluator.generate`` reports."""
    gen = cfg.generation
    policy = LanguageModel(cfg.model)
    params, param_sh = abstract_params(policy, mesh)
    reward_cfg, reward_model, reward_params = reward_model_of(cfg, mesh)
    # the evaluator reads only the tokenizer's EOS and padding ids while building its programs
    evaluator = PolicyEvaluator(policy, reward_model_score(reward_model), mesh, param_sh,
                                types.SimpleNamespace(eos_id=1, pad_id=0), gen.sampling, cfg.seed)
    return evaluator_programs("best_of_n", "", evaluator, cfg, reward_cfg, params, params, reward_params, mesh,
                              gen.prompts.batch_size, gen.prompts.max_len)
