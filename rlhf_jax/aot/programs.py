"""Every program a stage runs, built by the stages' own step builders on a given mesh
with abstract inputs (shapes, dtypes and shardings only), ready to be lowered and compiled.

Nothing here allocates: train states come from ``jax.eval_shape`` over
``steps.create_train_state`` itself (its inner ``jit`` is traced, not run), batches are
``ShapeDtypeStruct``s of the shapes the stage's config gives. So the same code describes a
TPU pod from a CPU host.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax import sharding, steps
from rlhf_jax.config import Config, LoRAConfig, ModelConfig, PPOConfig, SFTConfig
from rlhf_jax.evaluation import PolicyEvaluator
from rlhf_jax.models import LanguageModel, ScalarModel, lora
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.policy import reward_model_score
from rlhf_jax.ppo_steps import make_experience_fn, make_ppo_update
from rlhf_jax.sampling import Samples, make_sampler
from rlhf_jax.online_steps import takes_sampler_logprobs
from rlhf_jax.stages.online import check_online_config
from rlhf_jax.types import PPOState, RankingBatch, Rollout, TokenBatch

STAGES = ("pretrain", "sft", "comparisons", "rm", "ppo")
_SCHEDULE_STEPS = 1000  # the learning-rate schedule's length changes no shape


@dataclasses.dataclass
class Program:
    """One jitted program of a stage, with abstract arguments. ``passes`` says what the
    analytic estimate needs: each forward pass as (model config, rows, tokens a row,
    whether it is differentiated, whether it unembeds the vocabulary)."""

    stage: str
    name: str
    jitted: Any  # a jax.jit object (``jit_under_mesh(...).jitted``)
    args: tuple
    state: Any  # the abstract train/PPO state or params it carries (for the estimate)
    passes: list[tuple[ModelConfig, int, int, bool, bool]]
    trainable: Any = None  # abstract params whose gradients the program holds
    cache_tokens: int = 0  # a sampler's KV-cache slots a row
    donates: bool = False  # its first argument (the state) is donated: outputs overwrite it


def abstract_train_state(model, tx, mesh: Mesh, seed: int = 0) -> tuple[Any, Any]:
    """(abstract TrainState with shardings, its shardings): ``steps.create_train_state``
    itself, under ``sharding.abstract_creation`` (the stage's own state, allocated nowhere)."""
    with sharding.abstract_creation():
        return steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(seed))


def _batch(mesh: Mesh, shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def token_batch(mesh: Mesh, rows: int, length: int) -> TokenBatch:
    return TokenBatch(tokens=_batch(mesh, (rows, length)), loss_mask=_batch(mesh, (rows, length), jnp.float32),
                      segment_ids=_batch(mesh, (rows, length)), positions=_batch(mesh, (rows, length)))


def _replicated(mesh: Mesh, shape=(), dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def _rng(mesh: Mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def lm_programs(cfg: Config, stage: str, stage_cfg: SFTConfig, mesh: Mesh) -> list[Program]:
    """Pretraining or SFT: the train step and the validation loss (``stages/sft.py``)."""
    model = LanguageModel(cfg.model, dropout_rate=stage_cfg.dropout)
    tx = make_optimizer(stage_cfg.optim, _SCHEDULE_STEPS)
    state, state_shardings = abstract_train_state(model, tx, mesh, cfg.seed)
    data = stage_cfg.data
    right_padded = not data.packing
    step = steps.make_sft_step(model, tx, mesh, state_shardings, stage_cfg.optim.grad_accum_steps,
                               learning_rate_schedule(stage_cfg.optim, _SCHEDULE_STEPS), right_padded=right_padded)
    evaluate = steps.make_lm_eval_step(model, mesh, state_shardings.params, right_padded)
    micro = data.batch_size // stage_cfg.optim.grad_accum_steps
    batch = token_batch(mesh, data.batch_size, data.max_len)
    return [Program(stage, "train_step", step.jitted, (state, batch), state,
                    [(cfg.model, micro, data.max_len, True, True)], trainable=lora.split_trainable(state.params)[0], donates=True),
            Program(stage, "eval_step", evaluate.jitted, (state.params, batch), state.params,
                    [(cfg.model, data.batch_size, data.max_len, False, True)])]


def rm_programs(cfg: Config, mesh: Mesh) -> list[Program]:
    """The reward model: train step, validation, and scoring demonstrations (``stages/rm.py``)."""
    rm = cfg.rm
    model_cfg = rm.model or cfg.model
    model = ScalarModel(model_cfg, dropout_rate=rm.dropout)
    tx = make_optimizer(rm.optim, _SCHEDULE_STEPS)
    state, state_shardings = abstract_train_state(model, tx, mesh, cfg.seed)
    b, k, t = rm.data.batch_size, rm.k_max, rm.data.max_len
    ranking = RankingBatch(tokens=_batch(mesh, (b, k, t)), segment_ids=_batch(mesh, (b, k, t)),
                           positions=_batch(mesh, (b, k, t)), last_index=_batch(mesh, (b, k)),
                           ranks=_batch(mesh, (b, k)), mask=_batch(mesh, (b, k), jnp.bool_))
    step = steps.make_rm_step(model, tx, mesh, state_shardings, rm.optim.grad_accum_steps,
                              learning_rate_schedule(rm.optim, _SCHEDULE_STEPS))
    evaluate = steps.make_rm_eval_step(model, mesh, state_shardings.params)
    score = steps.make_score_fn(model, mesh, state_shardings.params, right_padded=True)
    rows = (_batch(mesh, (b, t)),) * 3
    micro = b // rm.optim.grad_accum_steps
    return [Program("rm", "train_step", step.jitted, (state, ranking), state,
                    [(model_cfg, micro * k, t, True, False)], trainable=lora.split_trainable(state.params)[0], donates=True),
            Program("rm", "eval_step", evaluate.jitted, (state.params, ranking), state.params,
                    [(model_cfg, b * k, t, False, False)]),
            Program("rm", "score", score.jitted, (state.params, *rows), state.params,
                    [(model_cfg, b, t, False, False)])]


def _sampler_program(stage: str, name: str, sampler: Callable, model_cfg: ModelConfig, params, mesh: Mesh,
                     rows: int, prompt_len: int, new_tokens: int) -> Program:
    prompts = (_batch(mesh, (rows, prompt_len)), _batch(mesh, (rows, prompt_len)))
    return Program(stage, name, sampler.jitted, (params, *prompts, _rng(mesh)), params,
                   [(model_cfg, rows, prompt_len, False, False)], cache_tokens=prompt_len + new_tokens)


def comparisons_programs(cfg: Config, mesh: Mesh) -> list[Program]:
    """Collecting comparisons: one sampler over every prompt repeated per policy (``stages/comparisons.py``)."""
    c = cfg.comparisons
    model = LanguageModel(cfg.model)
    params, param_shardings = _abstract_params(model, mesh)
    rows = c.prompts.batch_size * -(-c.k_max // len(c.policies))
    sampler = make_sampler(model, c.sampling, mesh, param_shardings, eos_id=1, pad_id=0)
    return [_sampler_program("comparisons", "sampler", sampler, cfg.model, params, mesh, rows, c.prompts.max_len,
                             c.sampling.max_new_tokens)]


def _abstract_params(model, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract params with shardings, their shardings): the restore target a stage loads into."""
    from rlhf_jax import parameters

    params = parameters.abstract(model, mesh)
    return params, jax.tree.map(lambda x: x.sharding, params)


def ppo_programs(cfg: Config, mesh: Mesh, ppo: PPOConfig | None = None) -> list[Program]:
    """PPO (PPO-ptx when ``ppo.ptx_coef``): sampler, experience, update and the held-out
    evaluation's programs, as ``stages/ppo.py`` builds them."""
    ppo, gen = ppo or cfg.ppo, cfg.generation
    updates = check_online_config(ppo, "ppo", mesh, ppo.pretrain.batch_size if ppo.ptx_coef else 0)
    policy = LanguageModel(cfg.model)
    scalar_cfg = cfg.rm.model or cfg.model  # the RM's architecture: the reward and value models
    scalar = ScalarModel(scalar_cfg)
    policy_tx = make_optimizer(ppo.policy_optim, _SCHEDULE_STEPS)
    value_tx = make_optimizer(ppo.value_optim, _SCHEDULE_STEPS)
    policy_state, policy_sh = abstract_train_state(policy, policy_tx, mesh, cfg.seed)
    value_state, value_sh = abstract_train_state(scalar, value_tx, mesh, cfg.seed)
    replicated = sharding.replicated(mesh)
    # as stages/ppo.py holds them: the EMA of what trains; with LoRA the KL reference is the
    # policy's base (adapters off) and the reward model an export's merged weights
    state = PPOState(policy=policy_state, value=value_state, ema_params=lora.split_trainable(policy_state.params)[0],
                     kl_coef=_replicated(mesh))
    state_sh = PPOState(policy=policy_sh, value=value_sh, ema_params=lora.split_trainable(policy_sh.params)[0],
                        kl_coef=replicated)
    reference = lora.base_params(policy_state.params) if cfg.model.lora.enabled else policy_state.params
    reward_model = ScalarModel(dataclasses.replace(scalar_cfg, lora=LoRAConfig()))
    reward_params = (_abstract_params(reward_model, mesh)[0] if scalar_cfg.lora.enabled else value_state.params)
    b, p, n = ppo.prompts.batch_size, ppo.prompts.max_len, gen.sampling.max_new_tokens
    samples = Samples(prompt_tokens=_batch(mesh, (b, p)), prompt_segments=_batch(mesh, (b, p)),
                      tokens=_batch(mesh, (b, n)), logprobs=_batch(mesh, (b, n), jnp.float32),
                      mask=_batch(mesh, (b, n), jnp.bool_), ended=_batch(mesh, (b,), jnp.bool_))
    rollout = Rollout(**{f: _batch(mesh, (b, p + n)) for f in ("tokens", "segment_ids", "positions")},
                      **{f: _batch(mesh, (b, n), jnp.float32) for f in ("response_mask", "old_logprobs", "ref_logprobs",
                                                                         "old_values", "advantages", "returns")})
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    ptx_rows, ptx_len = ((updates * ppo.pretrain.batch_size, ppo.pretrain.max_len) if ppo.ptx_coef
                         else (updates * shards, 2))
    sampler = make_sampler(policy, gen.sampling, mesh, policy_sh.params, eos_id=1, pad_id=0)
    experience = make_experience_fn(policy, scalar, reward_model_score(reward_model), ppo, gen.sampling, 0.0, 1.0,
                                    mesh)
    update = make_ppo_update(policy, scalar, policy_tx, value_tx, ppo, gen.sampling, mesh, state_sh)
    eval_temperature = gen.sampling.temperature if gen.eval_temperature is None else gen.eval_temperature
    # the evaluator reads only the tokenizer's EOS and padding ids while building its programs
    evaluator = PolicyEvaluator(policy, reward_model_score(reward_model), mesh, policy_sh.params,
                                types.SimpleNamespace(eos_id=1, pad_id=0),
                                dataclasses.replace(gen.sampling, temperature=eval_temperature), cfg.seed,
                                gen.kl_estimator)
    mb, length = ppo.minibatch_size, p + n
    logits_passes = 1 if takes_sampler_logprobs(ppo, gen.sampling) else 2
    update_passes = [(cfg.model, mb, length, True, True), (scalar_cfg, mb, length, True, False)]
    if ppo.ptx_coef:
        update_passes.append((cfg.model, ppo.pretrain.batch_size, ppo.pretrain.max_len, True, True))
    programs = [
        _sampler_program("ppo", "sampler", sampler, cfg.model, policy_state.params, mesh, b, p, n),
        Program("ppo", "experience", experience.jitted, (state, reference, reward_params, samples),
                (policy_state.params, reference, value_state.params, reward_params),
                [(cfg.model, b, length, False, True)] * logits_passes + [(scalar_cfg, b, length, False, False)] * 2),
        Program("ppo", "update", update.jitted,
                (state, rollout, token_batch(mesh, ptx_rows, ptx_len), _replicated(mesh), _rng(mesh)), state,
                update_passes, trainable=(lora.split_trainable(policy_state.params)[0],
                                          lora.split_trainable(value_state.params)[0]), donates=True),
    ]
    if eval_temperature != gen.sampling.temperature:  # else the same program as the training sampler
        programs.append(_sampler_program("ppo", "eval_sampler", evaluator.sampler, cfg.model, policy_state.params,
                                         mesh, b, p, n))
    programs.append(Program("ppo", "eval_score", evaluator.score.jitted, (reward_params, samples), reward_params,
                            [(scalar_cfg, b, length, False, False)]))
    if evaluator.kl is not None:
        programs.append(Program("ppo", "eval_kl", evaluator.kl.jitted,
                                (policy_state.params, reference, samples), policy_state.params,
                                [(cfg.model, b, length, False, True)] * 2))
    if ppo.pretrain.val_path:
        programs.append(Program("ppo", "eval_pretrain_loss", evaluator.lm_eval.jitted,
                                (policy_state.params, token_batch(mesh, ppo.pretrain.batch_size, ppo.pretrain.max_len)),
                                policy_state.params,
                                [(cfg.model, ppo.pretrain.batch_size, ppo.pretrain.max_len, False, True)]))
    return programs


def stage_programs(cfg: Config, stages: tuple[str, ...], mesh: Mesh) -> list[Program]:
    """The programs of ``stages`` (a subset of :data:`STAGES`), in pipeline order."""
    programs = []
    for stage in stages:
        if stage == "pretrain":
            programs += lm_programs(cfg, "pretrain", cfg.pretrain, mesh)
        elif stage == "sft":
            programs += lm_programs(cfg, "sft", cfg.sft, mesh)
        elif stage == "comparisons":
            programs += comparisons_programs(cfg, mesh)
        elif stage == "rm":
            programs += rm_programs(cfg, mesh)
        elif stage == "ppo":
            programs += ppo_programs(cfg, mesh)
    return programs
