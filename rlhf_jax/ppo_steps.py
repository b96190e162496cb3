"""PPO's jitted pieces: scoring sampled episodes into a :class:`Rollout` (experience) and
the update (minibatches x epochs of clipped policy and value steps, in one ``lax.scan``).

Response positions: with prompts of length P, the logits at positions ``P-1 .. L-2``
predict the response tokens at ``P .. L-1``; values are read at the same positions (the
state before each response token).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import lm_terms, losses, sharding
from rlhf_jax.config import PPOConfig
from rlhf_jax.models import lora
from rlhf_jax.policy import RewardFn, response_terms, response_values
from rlhf_jax.sampling import Samples
from rlhf_jax.sharding import jit_under_mesh
from rlhf_jax.steps import apply_gradients, split_microbatches, trainable_value_and_grad
from rlhf_jax.types import PPOState, Rollout, TokenBatch


def takes_sampler_logprobs(cfg: PPOConfig) -> bool:
    """Whether experience takes the sampler's log-probs (``cfg.old_logprobs == "sampler"``):
    they are the ones a forward pass gives (logits over the temperature, log-softmax before
    top-k/top-p filtering, :func:`rlhf_jax.sampling.choose_tokens`), up to the KV cache's
    rounding, whenever the sampler samples (temperature > 0)."""
    return cfg.old_logprobs == "sampler" and cfg.sampling.temperature > 0


def make_experience_fn(policy: nn.Module, value_model: nn.Module, reward_fn: RewardFn, cfg: PPOConfig,
                       reward_offset: float, reward_gain: float, mesh: Mesh) -> Callable:
    """experience(policy_params, ref_params, value_params, reward_params, samples, kl_coef)
    -> (Rollout, metrics): the behaviour policy's log-probs (the sampler's, see
    :func:`takes_sampler_logprobs`, or recomputed), reference log-probs, values, the score
    (``reward_fn``: the reward model, or any programmatic reward; minus the missing-EOS
    penalty), KL-shaped per-token rewards, GAE advantages and returns."""

    def experience(policy_params, ref_params, value_params, reward_params, samples: Samples, kl_coef):
        prompt_len = samples.prompt_tokens.shape[1]
        tokens, segments, positions = samples.full_sequences()
        mask = samples.mask.astype(jnp.float32)
        temperature = cfg.sampling.temperature
        if takes_sampler_logprobs(cfg):
            old_logp = samples.logprobs * mask
        else:
            old_logp = response_terms(policy, policy_params, tokens, segments, positions, prompt_len,
                                      temperature).logprobs * mask
        ref_logp = response_terms(policy, ref_params, tokens, segments, positions, prompt_len,
                                  temperature).logprobs * mask
        values = response_values(value_model, value_params, tokens, segments, positions, prompt_len) * mask
        score = reward_fn(reward_params, samples)
        penalized = score - cfg.missing_eos_penalty * (1.0 - samples.ended.astype(jnp.float32))
        rewards, kl_metrics = losses.kl_shaped_rewards(old_logp, ref_logp, penalized, mask, kl_coef,
                                                       cfg.kl_estimator)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
        rollout = Rollout(tokens=tokens, segment_ids=segments, positions=positions, response_mask=mask,
                          old_logprobs=old_logp, ref_logprobs=ref_logp, old_values=values,
                          advantages=advantages, returns=returns)
        metrics = {
            **kl_metrics,
            "ppo/score": jnp.mean(score),
            "ppo/score_raw": jnp.mean(score) / reward_gain + reward_offset,
            "ppo/score_penalized": jnp.mean(penalized),
            "ppo/response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "ppo/eos_rate": jnp.mean(samples.ended.astype(jnp.float32)),
            "value/explained_variance": losses.explained_variance(values, returns, mask),
            "ppo/return_mean": losses.masked_mean(returns, mask),
        }
        return rollout, metrics

    # Inputs arrive already placed (params in their shardings, samples batch-split).
    return jit_under_mesh(experience, mesh)


def make_ppo_update(policy: nn.Module, value_model: nn.Module, policy_tx: optax.GradientTransformation,
                    value_tx: optax.GradientTransformation, cfg: PPOConfig, mesh: Mesh,
                    state_shardings: Any) -> Callable:
    """update(state, rollout, ptx, observed_kl, rng) -> (state, metrics).

    ``cfg.epochs`` passes over the rollout in random minibatches of ``cfg.minibatch_size``
    episodes; each minibatch is one policy step (clipped surrogate - entropy bonus
    + ptx_coef * pretraining NLL on its ``pretrain.batch_size`` rows of ``ptx``) and one value
    step (clipped value loss), then the policy EMA moves. Finally beta moves if adaptive.
    ptx: TokenBatch ``[epochs * n_minibatches * rows, T]`` (unused when ptx_coef is 0).
    """
    controller = losses.AdaptiveKLController(cfg.kl_target, cfg.kl_horizon)
    temperature = cfg.sampling.temperature

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
        return total, {**pg_metrics, **entropy_metrics, **ptx_metrics, **terms}

    def value_objective(params, mb: Rollout, prompt_len):
        values = response_values(value_model, params, mb.tokens, mb.segment_ids, mb.positions, prompt_len)
        return losses.value_loss(values, mb.old_values, mb.returns, mb.response_mask, cfg.value_clip)

    def minibatch_step(state: PPOState, xs):
        mb, ptx = xs
        prompt_len = mb.tokens.shape[1] - mb.response_mask.shape[1]
        (_, p_metrics), p_grads = trainable_value_and_grad(policy_objective, state.policy.params, mb, ptx,
                                                           prompt_len)
        (_, v_metrics), v_grads = trainable_value_and_grad(value_objective, state.value.params, mb, prompt_len)
        policy_state = apply_gradients(state.policy, p_grads, policy_tx)
        ema = state.ema_params  # of the trainable part: with LoRA, the adapters
        if cfg.ema_decay:
            ema = optax.incremental_update(lora.split_trainable(policy_state.params)[0], ema, 1.0 - cfg.ema_decay)
        metrics = {**p_metrics, **v_metrics, "optim/policy_grad_norm": optax.tree.norm(p_grads),
                   "optim/value_grad_norm": optax.tree.norm(v_grads)}
        return state.replace(policy=policy_state, value=apply_gradients(state.value, v_grads, value_tx),
                             ema_params=ema), metrics

    def update(state: PPOState, rollout: Rollout, ptx: TokenBatch, observed_kl, rng):
        n_episodes = rollout.tokens.shape[0]
        n_minibatches = n_episodes // cfg.minibatch_size
        ptx_per_epoch = split_microbatches(ptx, cfg.epochs)

        def epoch(state, xs):
            epoch_rng, epoch_ptx = xs
            order = jax.random.permutation(epoch_rng, n_episodes)
            shuffled = jax.tree.map(lambda x: x[order], rollout)
            minibatches = split_microbatches(shuffled, n_minibatches)
            return jax.lax.scan(minibatch_step, state, (minibatches, split_microbatches(epoch_ptx, n_minibatches)))

        state, metrics = jax.lax.scan(epoch, state, (jax.random.split(rng, cfg.epochs), ptx_per_epoch))
        if cfg.adaptive_kl:
            state = state.replace(kl_coef=controller.update(state.kl_coef, observed_kl, n_episodes))
        return state, jax.tree.map(jnp.mean, metrics)

    batch = sharding.batch_sharding(mesh, 1)
    rollout_shardings = Rollout(**{k: batch for k in Rollout.__dataclass_fields__})
    ptx_shardings = TokenBatch(**{k: batch for k in TokenBatch.__dataclass_fields__})
    return jit_under_mesh(update, mesh, in_shardings=(state_shardings, rollout_shardings, ptx_shardings,
                                                      sharding.replicated(mesh), sharding.replicated(mesh)),
                          out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
