"""PPO's jitted pieces: scoring sampled episodes into a :class:`Rollout` (experience) and
the update (minibatches x epochs of clipped policy and value steps, in one ``lax.scan``,
:func:`rlhf_jax.online_steps.make_update`).

Response positions: with prompts of length P, the logits at positions ``P-1 .. L-2``
predict the response tokens at ``P .. L-1``; values are read at the same positions (the
state before each response token).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import lm_terms, losses
from rlhf_jax.config import PPOConfig, SamplingConfig
from rlhf_jax.online_steps import (episode_logprobs, episode_metrics, make_update, penalized_scores, policy_step,
                                   shardings_of_batch)
from rlhf_jax.policy import RewardFn, response_terms, response_values
from rlhf_jax.sampling import Samples
from rlhf_jax.sharding import jit_under_mesh
from rlhf_jax.steps import apply_gradients, trainable_value_and_grad
from rlhf_jax.types import PPOState, Rollout, TokenBatch


def make_experience_fn(policy: nn.Module, value_model: nn.Module, reward_fn: RewardFn, cfg: PPOConfig,
                       sampling: SamplingConfig, reward_offset: float, reward_gain: float, mesh: Mesh) -> Callable:
    """experience(state, ref_params, reward_params, samples) -> (Rollout, observed_kl, metrics):
    the behaviour policy's log-probs (the sampler's, see
    :func:`~rlhf_jax.online_steps.takes_sampler_logprobs`, or recomputed), reference
    log-probs, values, the score (``reward_fn``: the reward model, or any programmatic
    reward; minus the missing-EOS penalty), KL-shaped per-token rewards, GAE advantages and
    returns. ``observed_kl``: the mean per-episode KL, what the adaptive controller tracks."""

    def experience(state: PPOState, ref_params, reward_params, samples: Samples):
        prompt_len = samples.prompt_tokens.shape[1]
        tokens, segments, positions = samples.full_sequences()
        mask = samples.mask.astype(jnp.float32)
        old_logp, ref_logp = episode_logprobs(policy, state.policy.params, ref_params, samples, cfg, sampling)
        values = response_values(value_model, state.value.params, tokens, segments, positions, prompt_len) * mask
        score, penalized = penalized_scores(reward_fn, reward_params, samples, cfg.missing_eos_penalty)
        rewards, kl_metrics = losses.kl_shaped_rewards(old_logp, ref_logp, penalized, mask, state.kl_coef,
                                                       cfg.kl_estimator)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
        rollout = Rollout(tokens=tokens, segment_ids=segments, positions=positions, response_mask=mask,
                          old_logprobs=old_logp, ref_logprobs=ref_logp, old_values=values,
                          advantages=advantages, returns=returns)
        metrics = {
            **losses.named("ppo", {**kl_metrics, **episode_metrics(score, penalized, samples, reward_offset,
                                                                   reward_gain),
                                   "return_mean": losses.masked_mean(returns, mask)}),
            "value/explained_variance": losses.explained_variance(values, returns, mask),
        }
        return rollout, kl_metrics["kl_to_ref"], metrics

    # Inputs arrive already placed (params in their shardings, samples batch-split).
    return jit_under_mesh(experience, mesh)


def make_ppo_update(policy: nn.Module, value_model: nn.Module, policy_tx: optax.GradientTransformation,
                    value_tx: optax.GradientTransformation, cfg: PPOConfig, sampling: SamplingConfig, mesh: Mesh,
                    state_shardings: Any) -> Callable:
    """update(state, rollout, ptx, observed_kl, rng) -> (state, metrics).

    ``cfg.epochs`` passes over the rollout in random minibatches of ``cfg.minibatch_size``
    episodes (:func:`~rlhf_jax.online_steps.make_update`); each minibatch is one policy step
    (clipped surrogate - entropy bonus + ptx_coef * pretraining NLL on its
    ``pretrain.batch_size`` rows of ``ptx``) and one value step (clipped value loss), then the
    policy EMA moves. Finally beta moves if adaptive, toward ``observed_kl``.
    ptx: TokenBatch ``[epochs * n_minibatches * rows, T]`` (unused when ptx_coef is 0).
    """
    controller = losses.AdaptiveKLController(cfg.kl_target, cfg.kl_horizon)
    temperature = sampling.temperature

    def policy_objective(params, mb: Rollout, ptx: TokenBatch, prompt_len):
        # log-probs and entropy of the distribution the episodes were sampled from
        terms = response_terms(policy, params, mb.tokens, mb.segment_ids, mb.positions, prompt_len, temperature,
                               with_entropy=True)
        pg, pg_metrics = losses.ppo_policy_loss(terms.logprobs, mb.old_logprobs, mb.advantages, mb.response_mask,
                                                cfg.clip)
        entropy, entropy_metrics = losses.entropy_from_terms(terms.entropy, mb.response_mask)
        ptx_value, ptx_metrics = jnp.zeros(()), {}
        if cfg.ptx_coef:
            # unpacked pretraining rows are one piece then padding: a GPU may take cuDNN
            ptx_terms = lm_terms.next_token_terms(policy, params, ptx.tokens, ptx.positions, ptx.segment_ids,
                                                  right_padded=not cfg.pretrain.packing)
            ptx_value, ptx_metrics = losses.ptx_loss_from_terms(ptx_terms.logprobs, ptx_terms.is_top, ptx.loss_mask)
        total, terms = losses.ppo_objective(pg, entropy, ptx_value, entropy_coef=cfg.entropy_coef,
                                            ptx_coef=cfg.ptx_coef)
        return total, {**losses.named("ppo", {**pg_metrics, **entropy_metrics, **terms}),
                       **losses.named("ptx", ptx_metrics)}

    def value_objective(params, mb: Rollout, prompt_len):
        values = response_values(value_model, params, mb.tokens, mb.segment_ids, mb.positions, prompt_len)
        loss, metrics = losses.value_loss(values, mb.old_values, mb.returns, mb.response_mask, cfg.value_clip)
        return loss, losses.named("value", metrics)

    def minibatch_step(state: PPOState, xs):
        mb, ptx = xs
        prompt_len = mb.tokens.shape[1] - mb.response_mask.shape[1]
        # gradients of the trainable part only (with LoRA: the adapters and the value head)
        (_, p_metrics), p_grads = trainable_value_and_grad(policy_objective, state.policy.params, mb, ptx,
                                                           prompt_len)
        (_, v_metrics), v_grads = trainable_value_and_grad(value_objective, state.value.params, mb, prompt_len)
        policy_state, ema = policy_step(state.policy, state.ema_params, p_grads, policy_tx, cfg.ema_decay)
        metrics = {**p_metrics, **v_metrics, "optim/policy_grad_norm": optax.tree.norm(p_grads),
                   "optim/value_grad_norm": optax.tree.norm(v_grads)}
        return state.replace(policy=policy_state, value=apply_gradients(state.value, v_grads, value_tx),
                             ema_params=ema), metrics

    def adapt_beta(state: PPOState, observed_kl, n_episodes: int) -> PPOState:
        return state.replace(kl_coef=controller.update(state.kl_coef, observed_kl, n_episodes))

    return make_update(minibatch_step, cfg, mesh, state_shardings, shardings_of_batch(mesh, Rollout),
                       shardings_of_batch(mesh, TokenBatch), adapt_beta if cfg.adaptive_kl else None)
