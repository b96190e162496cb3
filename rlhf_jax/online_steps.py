"""The jitted pieces every online method shares (PPO, RLOO, GRPO): the episodes' behaviour and
reference log-probs, their scores, the update's epochs x minibatches scan, and the policy's
optimiser step with its EMA; and the experience and update of a critic-free method, whose
advantages and loss a method supplies (:class:`CriticFree`).

Response positions: with prompts of length P, the logits at positions ``P-1 .. L-2``
predict the response tokens at ``P .. L-1``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import losses, sharding
from rlhf_jax.config import OnlineConfig, SamplingConfig
from rlhf_jax.models import lora
from rlhf_jax.policy import RewardFn, response_terms
from rlhf_jax.sampling import Samples
from rlhf_jax.sharding import jit_under_mesh
from rlhf_jax.steps import apply_gradients, split_microbatches, trainable_value_and_grad
from rlhf_jax.types import GroupRollout, PolicyState, TrainState

Array = jax.Array


def takes_sampler_logprobs(cfg: OnlineConfig, sampling: SamplingConfig) -> bool:
    """Whether experience takes the sampler's log-probs (``cfg.old_logprobs == "sampler"``):
    they are the ones a forward pass gives (logits over the temperature, log-softmax before
    top-k/top-p filtering, :func:`rlhf_jax.sampling.choose_tokens`), up to the KV cache's
    rounding, whenever the sampler samples (temperature > 0)."""
    return cfg.old_logprobs == "sampler" and sampling.temperature > 0


def episode_logprobs(policy: nn.Module, params: Any, ref_params: Any, samples: Samples, cfg: OnlineConfig,
                     sampling: SamplingConfig) -> tuple[Array, Array]:
    """(behaviour, reference) log-probs ``[B, N] f32`` of the sampled responses at the
    sampling temperature, 0 off the response: the behaviour's from the sampler (see
    :func:`takes_sampler_logprobs`) or a forward pass of ``params``; the reference's from a
    forward pass of ``ref_params``."""
    prompt_len = samples.prompt_tokens.shape[1]
    tokens, segments, positions = samples.full_sequences()
    mask = samples.mask.astype(jnp.float32)
    temperature = sampling.temperature

    def logprobs(p):
        return response_terms(policy, p, tokens, segments, positions, prompt_len, temperature).logprobs * mask

    old_logp = samples.logprobs * mask if takes_sampler_logprobs(cfg, sampling) else logprobs(params)
    return old_logp, logprobs(ref_params)


def penalized_scores(reward_fn: RewardFn, reward_params: Any, samples: Samples,
                     missing_eos_penalty: float) -> tuple[Array, Array]:
    """(score, score less ``missing_eos_penalty`` for each response that never ended) ``[B]``."""
    score = reward_fn(reward_params, samples)
    return score, score - missing_eos_penalty * (1.0 - samples.ended.astype(jnp.float32))


def episode_metrics(score: Array, penalized: Array, samples: Samples, reward_offset: float,
                    reward_gain: float) -> dict[str, Array]:
    """What every online method reports of its episodes (unprefixed)."""
    mask = samples.mask.astype(jnp.float32)
    return {"score": jnp.mean(score), "score_raw": jnp.mean(score) / reward_gain + reward_offset,
            "score_penalized": jnp.mean(penalized), "response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "eos_rate": jnp.mean(samples.ended.astype(jnp.float32))}


def policy_step(policy: TrainState, ema_params: Any, grads: Any, tx: optax.GradientTransformation,
                ema_decay: float) -> tuple[TrainState, Any]:
    """One optimiser step of the policy, then its EMA moves (unless ``ema_decay`` is 0).
    ``grads`` and ``ema_params`` cover the trainable part (with LoRA: the adapters; the
    frozen base does not move, so it needs no average)."""
    policy = apply_gradients(policy, grads, tx)
    if ema_decay:
        ema_params = optax.incremental_update(lora.split_trainable(policy.params)[0], ema_params, 1.0 - ema_decay)
    return policy, ema_params


MinibatchStep = Callable[[Any, tuple[Any, Any]], tuple[Any, dict]]  # (state, (minibatch, extra)) -> ...


def make_update(minibatch_step: MinibatchStep, cfg: OnlineConfig, mesh: Mesh, state_shardings: Any,
                batch_shardings: Any, extra_shardings: Any = None,
                finish: Callable[[Any, Array, int], Any] | None = None) -> Callable:
    """update(state, batch, extra, observed_kl, rng) -> (state, metrics), jitted, the state
    donated: ``cfg.epochs`` passes over the iteration's episodes (``batch``, leading dim B) in
    random minibatches of ``cfg.minibatch_size``, each a ``minibatch_step`` (the method's
    loss and optimiser steps); ``extra`` (PPO-ptx's pretraining rows, or None) is split the
    same way, one slice per minibatch. ``finish(state, observed_kl, B)`` runs after the
    passes (PPO's adaptive KL controller, fed the experience's KL, never a logged metric).
    Metrics: the mean over minibatches."""

    def update(state, batch, extra, observed_kl, rng):
        n_episodes = batch.tokens.shape[0]
        n_minibatches = n_episodes // cfg.minibatch_size
        extra_per_epoch = split_microbatches(extra, cfg.epochs)

        def epoch(state, xs):
            epoch_rng, epoch_extra = xs
            order = jax.random.permutation(epoch_rng, n_episodes)
            shuffled = jax.tree.map(lambda x: x[order], batch)
            minibatches = split_microbatches(shuffled, n_minibatches)
            return jax.lax.scan(minibatch_step, state, (minibatches, split_microbatches(epoch_extra, n_minibatches)))

        state, metrics = jax.lax.scan(epoch, state, (jax.random.split(rng, cfg.epochs), extra_per_epoch))
        if finish is not None:
            state = finish(state, observed_kl, n_episodes)
        return state, jax.tree.map(jnp.mean, metrics)

    replicated = sharding.replicated(mesh)
    return jit_under_mesh(update, mesh, in_shardings=(state_shardings, batch_shardings, extra_shardings, replicated,
                                                      replicated),
                          out_shardings=(state_shardings, replicated), donate_argnums=0)


def shardings_of_batch(mesh: Mesh, batch_cls: type) -> Any:
    """Every field of a batch struct split over the batch shards by its leading dimension."""
    batch = sharding.batch_sharding(mesh, 1)
    return batch_cls(**{name: batch for name in batch_cls.__dataclass_fields__})


# ---------------------------------------------------------------- critic-free methods

class CriticFree(Protocol):
    """What a critic-free method (RLOO, GRPO) supplies; the rest is shared.

    ``advantages(scores [B], logp, ref_logp, mask [B, N], kl_coef) -> (advantages [B],
    observed KL [], metrics)``: scores are the reward less the missing-EOS penalty, rows
    grouped by prompt (``reshape(-1, group_size)``), log-probs the behaviour's and the
    reference's. ``loss(logp [B, N], minibatch: GroupRollout) -> (loss, metrics)``: logp are
    the current policy's at the sampling temperature. Metrics unprefixed."""

    prefix: str  # the metrics' names: "rloo/score", ...

    def advantages(self, scores: Array, logp: Array, ref_logp: Array, mask: Array,
                   kl_coef: Array) -> tuple[Array, Array, dict]: ...

    def loss(self, logp: Array, minibatch: GroupRollout) -> tuple[Array, dict]: ...


def make_group_experience(method: CriticFree, policy: nn.Module, reward_fn: RewardFn, cfg: OnlineConfig,
                          sampling: SamplingConfig, reward_offset: float, reward_gain: float, mesh: Mesh) -> Callable:
    """experience(state, ref_params, reward_params, samples) -> (GroupRollout, observed_kl,
    metrics): behaviour and reference log-probs, scores, the method's advantages."""

    def experience(state: PolicyState, ref_params, reward_params, samples: Samples):
        tokens, segments, positions = samples.full_sequences()
        mask = samples.mask.astype(jnp.float32)
        old_logp, ref_logp = episode_logprobs(policy, state.policy.params, ref_params, samples, cfg, sampling)
        score, penalized = penalized_scores(reward_fn, reward_params, samples, cfg.missing_eos_penalty)
        advantages, observed_kl, metrics = method.advantages(penalized, old_logp, ref_logp, mask, state.kl_coef)
        rollout = GroupRollout(tokens=tokens, segment_ids=segments, positions=positions, response_mask=mask,
                               old_logprobs=old_logp, ref_logprobs=ref_logp, advantages=advantages)
        metrics = {**metrics, **episode_metrics(score, penalized, samples, reward_offset, reward_gain)}
        return rollout, observed_kl, losses.named(method.prefix, metrics)

    return jit_under_mesh(experience, mesh)  # inputs arrive placed


def make_group_update(method: CriticFree, policy: nn.Module, tx: optax.GradientTransformation, cfg: OnlineConfig,
                      sampling: SamplingConfig, mesh: Mesh, state_shardings: Any) -> Callable:
    """update(state, rollout, None, observed_kl, rng) -> (state, metrics): each minibatch one
    policy step on ``method.loss`` (then the EMA)."""
    temperature = sampling.temperature

    def minibatch_step(state: PolicyState, xs):
        mb, _ = xs
        prompt_len = mb.tokens.shape[1] - mb.response_mask.shape[1]

        def objective(params):
            terms = response_terms(policy, params, mb.tokens, mb.segment_ids, mb.positions, prompt_len, temperature)
            return method.loss(terms.logprobs, mb)

        (_, metrics), grads = trainable_value_and_grad(objective, state.policy.params)
        policy_state, ema = policy_step(state.policy, state.ema_params, grads, tx, cfg.ema_decay)
        metrics = {**losses.named(method.prefix, metrics), "optim/policy_grad_norm": optax.tree.norm(grads)}
        return state.replace(policy=policy_state, ema_params=ema), metrics

    return make_update(minibatch_step, cfg, mesh, state_shardings, shardings_of_batch(mesh, GroupRollout))
