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
from rlhf_jax.config import Config, LoRAConfig, ModelConfig, OnlineConfig, PPOConfig, SFTConfig
from rlhf_jax.evaluation import PolicyEvaluator
from rlhf_jax.models import LanguageModel, ScalarModel, lora
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.policy import reward_model_score
from rlhf_jax.ppo_steps import make_experience_fn, make_ppo_update
from rlhf_jax.sampling import Samples, make_sampler
from rlhf_jax.online_steps import takes_sampler_logprobs
from rlhf_jax.stages.online import check_online_config
from rlhf_jax.types import PPOState, RankingBatch, Rollout, TokenBatch

SCHEDULE_STEPS = 1000  # the learning-rate schedule's length changes no shape


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


def batch_struct(mesh: Mesh, shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def token_batch(mesh: Mesh, rows: int, length: int) -> TokenBatch:
    return TokenBatch(tokens=batch_struct(mesh, (rows, length)), loss_mask=batch_struct(mesh, (rows, length), jnp.float32),
                      segment_ids=batch_struct(mesh, (rows, length)), positions=batch_struct(mesh, (rows, length)))


def replicated_struct(mesh: Mesh, shape=(), dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def rng_struct(mesh: Mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def lm_programs(cfg: Config, stage: str, stage_cfg: SFTConfig, mesh: Mesh,
                model_cfg: ModelConfig | None = None) -> list[Program]:
    """Pretraining or SFT: the train step and the validation loss (``stages/sft.py``), of
    ``model_cfg`` (default ``cfg.model``; the pipeline's ``*_large`` stages: ``rm.model``)."""
    model_cfg = model_cfg or cfg.model
    model = LanguageModel(model_cfg, dropout_rate=stage_cfg.dropout)
    tx = make_optimizer(stage_cfg.optim, SCHEDULE_STEPS)
    state, state_shardings = abstract_train_state(model, tx, mesh, cfg.seed)
    data = stage_cfg.data
    right_padded = not data.packing
    step = steps.make_sft_step(model, tx, mesh, state_shardings, stage_cfg.optim.grad_accum_steps,
                               learning_rate_schedule(stage_cfg.optim, SCHEDULE_STEPS), right_padded=right_padded)
    evaluate = steps.make_lm_eval_step(model, mesh, state_shardings.params, right_padded)
    micro = data.batch_size // stage_cfg.optim.grad_accum_steps
    batch = token_batch(mesh, data.batch_size, data.max_len)
    return [Program(stage, "train_step", step.jitted, (state, batch), state,
                    [(model_cfg, micro, data.max_len, True, True)], trainable=lora.split_trainable(state.params)[0], donates=True),
            Program(stage, "eval_step", evaluate.jitted, (state.params, batch), state.params,
                    [(model_cfg, data.batch_size, data.max_len, False, True)])]


def ranking_batch(mesh: Mesh, rows: int, k: int, length: int) -> RankingBatch:
    """A batch of ``rows`` prompts' K-wise comparisons, as ``data.RankingBatches`` makes it."""
    return RankingBatch(**{f: batch_struct(mesh, (rows, k, length)) for f in ("tokens", "segment_ids", "positions")},
                        response_mask=batch_struct(mesh, (rows, k, length), jnp.float32),
                        last_index=batch_struct(mesh, (rows, k)), ranks=batch_struct(mesh, (rows, k)),
                        mask=batch_struct(mesh, (rows, k), jnp.bool_))


def rm_programs(cfg: Config, mesh: Mesh) -> list[Program]:
    """The reward model: train step, validation, and scoring demonstrations (``stages/rm.py``)."""
    rm = cfg.rm
    model_cfg = rm.model or cfg.model
    model = ScalarModel(model_cfg, dropout_rate=rm.dropout)
    tx = make_optimizer(rm.optim, SCHEDULE_STEPS)
    state, state_shardings = abstract_train_state(model, tx, mesh, cfg.seed)
    b, k, t = rm.data.batch_size, rm.k_max, rm.data.max_len
    ranking = ranking_batch(mesh, b, k, t)
    step = steps.make_rm_step(model, tx, mesh, state_shardings, rm.optim.grad_accum_steps,
                              learning_rate_schedule(rm.optim, SCHEDULE_STEPS))
    evaluate = steps.make_rm_eval_step(model, mesh, state_shardings.params)
    score = steps.make_score_fn(model, mesh, state_shardings.params, right_padded=True)
    rows = (batch_struct(mesh, (b, t)),) * 3
    micro = b // rm.optim.grad_accum_steps
    return [Program("rm", "train_step", step.jitted, (state, ranking), state,
                    [(model_cfg, micro * k, t, True, False)], trainable=lora.split_trainable(state.params)[0], donates=True),
            Program("rm", "eval_step", evaluate.jitted, (state.params, ranking), state.params,
                    [(model_cfg, b * k, t, False, False)]),
            Program("rm", "score", score.jitted, (state.params, *rows), state.params,
                    [(model_cfg, b, t, False, False)])]


def sampler_program(stage: str, name: str, sampler: Callable, model_cfg: ModelConfig, params, mesh: Mesh,
                     rows: int, prompt_len: int, new_tokens: int) -> Program:
    prompts = (batch_struct(mesh, (rows, prompt_len)), batch_struct(mesh, (rows, prompt_len)))
    return Program(stage, name, sampler.jitted, (params, *prompts, rng_struct(mesh)), params,
                   [(model_cfg, rows, prompt_len, False, False)], cache_tokens=prompt_len + new_tokens)


def comparisons_programs(cfg: Config, mesh: Mesh) -> list[Program]:
    """Collecting comparisons: one sampler over every prompt repeated per policy (``stages/comparisons.py``)."""
    c = cfg.comparisons
    model = LanguageModel(cfg.model)
    params, param_shardings = abstract_params(model, mesh)
    rows = c.prompts.batch_size * -(-c.k_max // len(c.policies))
    sampler = make_sampler(model, c.sampling, mesh, param_shardings, eos_id=1, pad_id=0)
    return [sampler_program("comparisons", "sampler", sampler, cfg.model, params, mesh, rows, c.prompts.max_len,
                             c.sampling.max_new_tokens)]


def abstract_params(model, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract params with shardings, their shardings): the restore target a stage loads into."""
    from rlhf_jax import parameters

    params = parameters.abstract(model, mesh)
    return params, jax.tree.map(lambda x: x.sharding, params)


def samples_struct(mesh: Mesh, rows: int, prompt_len: int, new_tokens: int) -> Samples:
    """What the sampler returns for ``rows`` prompts."""
    return Samples(prompt_tokens=batch_struct(mesh, (rows, prompt_len)),
                   prompt_segments=batch_struct(mesh, (rows, prompt_len)),
                   tokens=batch_struct(mesh, (rows, new_tokens)),
                   logprobs=batch_struct(mesh, (rows, new_tokens), jnp.float32),
                   mask=batch_struct(mesh, (rows, new_tokens), jnp.bool_), ended=batch_struct(mesh, (rows,), jnp.bool_))


def reward_model_of(cfg: Config, mesh: Mesh) -> tuple[ModelConfig, ScalarModel, Any]:
    """(its config, the reward model, its abstract params): an RM export (the RM's
    architecture, ``rm.model`` or ``model``; merged weights, so no adapters), as
    ``stages.online.load_reward`` loads it. A ``"gold"`` reward is a host callback holding no
    device memory: the RM stands in for it (an upper bound)."""
    reward_cfg = dataclasses.replace(cfg.rm.model or cfg.model, lora=LoRAConfig())
    reward_model = ScalarModel(reward_cfg)
    return reward_cfg, reward_model, abstract_params(reward_model, mesh)[0]


def evaluator_programs(stage: str, prefix: str, evaluator: PolicyEvaluator, cfg: Config, reward_cfg: ModelConfig,
                       params, reference, reward_params, mesh: Mesh, rows: int, prompt_len: int,
                       with_sampler: bool = True) -> list[Program]:
    """A :class:`PolicyEvaluator`'s programs on ``rows`` prompts (``generate``): its sampler
    (``with_sampler``), the reward's score and, when it samples, the KL to ``reference``;
    named ``prefix`` + sampler, score, kl."""
    new_tokens = evaluator.sampling.max_new_tokens
    samples, length = samples_struct(mesh, rows, prompt_len, new_tokens), prompt_len + new_tokens
    programs = [sampler_program(stage, f"{prefix}sampler", evaluator.sampler, cfg.model, params, mesh, rows,
                                prompt_len, new_tokens)] if with_sampler else []
    programs.append(Program(stage, f"{prefix}score", evaluator.score.jitted, (reward_params, samples), reward_params,
                            [(reward_cfg, rows, length, False, False)]))
    if evaluator.kl is not None:
        programs.append(Program(stage, f"{prefix}kl", evaluator.kl.jitted, (params, reference, samples), params,
                                [(cfg.model, rows, length, False, True)] * 2))
    return programs


@dataclasses.dataclass
class OnlineParts:
    """What ``stages/online.py`` builds for every online method: the policy and its train
    state (the SFT weights, with LoRA fresh adapters over them), the KL reference (with LoRA
    the policy's base, adapters off; else a copy of the SFT weights: the policy's shapes), the
    reward model, the training sampler and the held-out evaluation's programs."""

    policy: LanguageModel
    policy_tx: Any
    state: Any  # the policy's abstract TrainState
    shardings: Any  # its shardings
    reference: Any
    reward_cfg: ModelConfig
    reward_model: ScalarModel
    reward_params: Any
    sampler: Program
    evaluation: list[Program]


def online_parts(cfg: Config, stage: str, online: OnlineConfig, mesh: Mesh) -> OnlineParts:
    """:class:`OnlineParts` of ``online`` (a method's block) run as ``stage``: the sampler on
    the iteration's ``episodes`` (each prompt ``group_size`` times, as ``_Inputs`` repeats
    them); with ``prompts.val_path`` the evaluation on ``prompts.batch_size`` held-out prompts
    (its sampler too where its rows or temperature differ from training's) and its KL; with
    ``pretrain.val_path`` the pretraining loss."""
    gen = cfg.generation
    policy = LanguageModel(cfg.model)
    policy_tx = make_optimizer(online.policy_optim, SCHEDULE_STEPS)
    state, shardings = abstract_train_state(policy, policy_tx, mesh, cfg.seed)
    reference = lora.base_params(state.params) if cfg.model.lora.enabled else state.params
    reward_cfg, reward_model, reward_params = reward_model_of(cfg, mesh)
    b, p, n = online.prompts.batch_size, online.prompts.max_len, gen.sampling.max_new_tokens
    sampler = make_sampler(policy, gen.sampling, mesh, shardings.params, eos_id=1, pad_id=0)
    eval_temperature = gen.sampling.temperature if gen.eval_temperature is None else gen.eval_temperature
    # the evaluator reads only the tokenizer's EOS and padding ids while building its programs
    evaluator = PolicyEvaluator(policy, reward_model_score(reward_model), mesh, shardings.params,
                                types.SimpleNamespace(eos_id=1, pad_id=0),
                                dataclasses.replace(gen.sampling, temperature=eval_temperature), cfg.seed,
                                gen.kl_estimator)
    # else the held-out sampler is the training sampler's program
    own_sampler = eval_temperature != gen.sampling.temperature or online.group_size > 1
    evaluation = []
    if online.prompts.val_path:  # else no held-out generations
        evaluation += evaluator_programs(stage, "eval_", evaluator, cfg, reward_cfg, state.params, reference,
                                         reward_params, mesh, b, p, own_sampler)
    if online.pretrain.val_path:
        rows, length = online.pretrain.batch_size, online.pretrain.max_len
        evaluation.append(Program(stage, "eval_pretrain_loss", evaluator.lm_eval.jitted,
                                  (state.params, token_batch(mesh, rows, length)), state.params,
                                  [(cfg.model, rows, length, False, True)]))
    return OnlineParts(policy, policy_tx, state, shardings, reference, reward_cfg, reward_model, reward_params,
                       sampler_program(stage, "sampler", sampler, cfg.model, state.params, mesh, online.episodes, p,
                                       n), evaluation)


def ppo_programs(cfg: Config, mesh: Mesh, ppo: PPOConfig | None = None, stage: str = "ppo") -> list[Program]:
    """PPO (PPO-ptx when ``ppo.ptx_coef``): sampler, experience, update and the held-out
    evaluation's programs, as ``stages/ppo.py`` builds them."""
    ppo, gen = ppo or cfg.ppo, cfg.generation
    updates = check_online_config(ppo, stage, mesh, ppo.pretrain.batch_size if ppo.ptx_coef else 0)
    parts = online_parts(cfg, stage, ppo, mesh)
    policy, policy_state, policy_sh = parts.policy, parts.state, parts.shardings
    # the value model: the RM's architecture with the policy's adapters (stages/ppo.py)
    scalar_cfg = dataclasses.replace(cfg.rm.model or cfg.model, lora=cfg.model.lora)
    scalar = ScalarModel(scalar_cfg)
    value_tx = make_optimizer(ppo.value_optim, SCHEDULE_STEPS)
    value_state, value_sh = abstract_train_state(scalar, value_tx, mesh, cfg.seed)
    # as stages/ppo.py holds them: the EMA of what trains
    state = PPOState(policy=policy_state, value=value_state, ema_params=lora.split_trainable(policy_state.params)[0],
                     kl_coef=replicated_struct(mesh))
    state_sh = PPOState(policy=policy_sh, value=value_sh, ema_params=lora.split_trainable(policy_sh.params)[0],
                        kl_coef=sharding.replicated(mesh))
    b, p, n = ppo.prompts.batch_size, ppo.prompts.max_len, gen.sampling.max_new_tokens
    rollout = Rollout(**{f: batch_struct(mesh, (b, p + n)) for f in ("tokens", "segment_ids", "positions")},
                      **{f: batch_struct(mesh, (b, n), jnp.float32) for f in ("response_mask", "old_logprobs", "ref_logprobs",
                                                                         "old_values", "advantages", "returns")})
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    ptx_rows, ptx_len = ((updates * ppo.pretrain.batch_size, ppo.pretrain.max_len) if ppo.ptx_coef
                         else (updates * shards, 2))
    experience = make_experience_fn(policy, scalar, reward_model_score(parts.reward_model), ppo, gen.sampling, 0.0,
                                    1.0, mesh)
    update = make_ppo_update(policy, scalar, parts.policy_tx, value_tx, ppo, gen.sampling, mesh, state_sh)
    mb, length = ppo.minibatch_size, p + n
    logits_passes = 1 if takes_sampler_logprobs(ppo, gen.sampling) else 2
    update_passes = [(cfg.model, mb, length, True, True), (scalar_cfg, mb, length, True, False)]
    if ppo.ptx_coef:
        update_passes.append((cfg.model, ppo.pretrain.batch_size, ppo.pretrain.max_len, True, True))
    return [
        parts.sampler,
        Program(stage, "experience", experience.jitted,
                (state, parts.reference, parts.reward_params, samples_struct(mesh, b, p, n)),
                (policy_state.params, parts.reference, value_state.params, parts.reward_params),
                [(cfg.model, b, length, False, True)] * logits_passes
                + [(scalar_cfg, b, length, False, False), (parts.reward_cfg, b, length, False, False)]),
        Program(stage, "update", update.jitted,
                (state, rollout, token_batch(mesh, ptx_rows, ptx_len), replicated_struct(mesh), rng_struct(mesh)),
                state, update_passes, trainable=(lora.split_trainable(policy_state.params)[0],
                                                 lora.split_trainable(value_state.params)[0]), donates=True),
        *parts.evaluation]
