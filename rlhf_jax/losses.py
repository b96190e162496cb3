"""Every loss and estimator of the pipeline, as pure functions of arrays.

This is the researcher's file. Each loss takes arrays (shapes in the docstrings) and small
static arguments, and returns ``(scalar, metrics)`` where ``metrics`` is a flat dict of
unprefixed names (``loss``, ``accuracy``): the caller names its own (``named("rm", metrics)``
gives ``rm/loss``), so one function serves the RM and DPO, or PPO, RLOO and GRPO, alike.
Nothing here sees a model, a mesh or an optimiser. Masked means keep
an explicit denominator so micro-batches and packed rows reduce exactly: a loss given the
whole batch's ``denominator`` sums over micro-batches to the full-batch loss, while its
metrics describe the micro-batch alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def named(prefix: str, metrics: dict[str, Array]) -> dict[str, Array]:
    """``metrics`` with every key under ``prefix/``: how a caller names a shared function's
    metrics (``named("ppo", {"kl_to_ref": x}) == {"ppo/kl_to_ref": x}``)."""
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def masked_sum(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask.astype(x.dtype))


def masked_mean(x: Array, mask: Array, denominator: Array | None = None) -> Array:
    """Mean of ``x`` over ``mask``; ``denominator`` overrides the mask's count (e.g. the
    token count of the whole batch when ``x`` is one micro-batch). Empty masks give 0."""
    if denominator is None:
        denominator = jnp.sum(mask.astype(jnp.float32))
    return masked_sum(x, mask) / jnp.maximum(denominator, 1.0)


def target_count(loss_mask: Array) -> Array:
    """Number of next-token targets in a ``[B, T]`` loss mask (the SFT denominator)."""
    return jnp.sum(loss_mask[:, 1:].astype(jnp.float32))


def last_index(mask: Array) -> Array:
    """``[B] int32``: index of the last True in each row of ``mask`` ``[B, T]`` (0 if none)."""
    t = mask.shape[1]
    return (t - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def _token_terms(logits: Array, targets: Array, with_entropy: bool = False) -> tuple[Array, Array, Array | None]:
    """(``[B, T] f32`` log-probability of each target, ``[B, T] bool`` whether it has the
    highest logit, ``[B, T] f32`` entropy of each position's distribution or None) from
    logits ``[B, T, V] f32`` and targets ``[B, T] int32``.

    The target logit is picked by a compare-and-sum: picking with ``take_along_axis`` makes
    the backward pass scatter a ``[B, T, V]`` gradient (on CPU, 6% of a GPT-2 SFT step at
    V = 8192). "Highest" is ``target >= max``, the argmax test except on exact ties.
    """
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_normaliser = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    entropy = token_entropy(logits) if with_entropy else None
    return target_logit - log_normaliser, target_logit >= top, entropy


def _next_token_terms(logits: Array, tokens: Array) -> tuple[Array, Array]:
    """(``[B, T-1] f32`` log-probability of each next token, ``[B, T-1] bool`` whether it
    has the highest logit) from logits ``[B, T, V] f32`` and tokens ``[B, T] int32``.

    Computed on all T positions and sliced after the vocabulary reduction: slicing
    ``logits[:, :-1]`` first makes the backward pass pad a ``[B, T, V]`` gradient.
    """
    logprobs, is_top, _ = _token_terms(logits, jnp.roll(tokens, -1, axis=1))  # the last target is unused
    return logprobs[:, :-1], is_top[:, :-1]


class TokenTerms(NamedTuple):
    """What a language model says about the next token at each position, ``[B, T-1]``:
    logprobs (f32, of the token that follows), is_top (bool, it has the highest logit) and
    entropy (f32, of the whole next-token distribution; None when not asked for)."""

    logprobs: Array
    is_top: Array
    entropy: Array | None


def chunked_next_token_terms(hidden: Array, unembed: Callable[[Array], Array], tokens: Array, chunk: int,
                             temperature: float = 1.0, with_entropy: bool = False) -> TokenTerms:
    """:class:`TokenTerms` of ``tokens`` ``[B, T] int32`` from the final hidden states
    ``hidden`` ``[B, T, E]`` without ever holding more than ``[B, chunk, V]`` f32 logits.

    ``unembed``: ``[B, c, E] -> [B, c, V] f32`` logits (the model's unembedding, padded ids
    masked); they are divided by ``temperature`` (the sampling distribution's, 1: as is).
    The sequence is cut in chunks of ``chunk`` positions (the last one padded) and a
    ``lax.scan`` computes each chunk's logits, reduces them to the three ``[B, c]`` terms and
    drops them; the chunk body is rematerialised, so the backward pass recomputes one
    chunk's logits at a time and the unembedding's gradient accumulates chunk by chunk
    (MaxText's vocabulary tiling, Liger's fused linear cross-entropy, along the sequence).
    Every position's terms are those :func:`sft_loss` and :func:`entropy` compute from the
    whole ``[B, T, V]`` logits; with ``chunk >= T`` this *is* that computation, unchunked.
    """
    targets = jnp.roll(tokens, -1, axis=1)  # position t's target is token t+1; the last is unused

    def terms(h: Array, target: Array) -> tuple[Array, Array, Array | None]:
        logits = unembed(h)
        return _token_terms(logits if temperature == 1.0 else logits / temperature, target, with_entropy)

    b, t = tokens.shape
    if chunk >= t:
        out = terms(hidden, targets)
    else:
        n = -(-t // chunk)
        pad = n * chunk - t  # padded positions compute terms that are sliced off: no gradient
        split = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
            b, n, chunk, *x.shape[2:]).swapaxes(0, 1)
        body = jax.checkpoint(terms, prevent_cse=False)  # scan already keeps the recomputation apart
        _, out = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, (split(hidden), split(targets)))
        out = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], out)
    logprobs, is_top, entropy = jax.tree.map(lambda x: x[:, :-1], out)
    return TokenTerms(logprobs, is_top, entropy)


def next_token_logprobs(logits: Array, tokens: Array) -> Array:
    """Log-probability of each next token.

    logits: ``[B, T, V] f32``, tokens: ``[B, T] int32`` -> ``[B, T-1] f32`` where entry t is
    ``log p(tokens[t+1] | tokens[:t+1])``.
    """
    return _next_token_terms(logits, tokens)[0]


def sft_loss(logits: Array, tokens: Array, loss_mask: Array,
             denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy on the tokens ``loss_mask`` marks as targets.

    logits: ``[B, T, V] f32``; tokens: ``[B, T] int32``; loss_mask: ``[B, T]``, 1 where the
    token at that position is a target (so prompt tokens and padding cost nothing);
    denominator: target count to divide by (default: this batch's).
    Returns (mean NLL per target token, metrics).
    """
    return sft_loss_from_terms(*_next_token_terms(logits, tokens), loss_mask, denominator)


def sft_loss_from_terms(logprobs: Array, is_top: Array, loss_mask: Array,
                        denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """:func:`sft_loss` from the next-token terms (``[B, T-1]``, e.g. of
    :func:`chunked_next_token_terms`): logprobs f32, is_top bool; loss_mask ``[B, T]``."""
    target_mask = loss_mask[:, 1:].astype(jnp.float32)
    nll = -logprobs
    loss = masked_mean(nll, target_mask, denominator)
    metrics = {  # over this batch alone, whatever ``denominator`` is
        "loss": masked_mean(nll, target_mask),
        "accuracy": masked_mean(is_top.astype(jnp.float32), target_mask),
        "target_tokens": jnp.sum(target_mask),
    }
    return loss, metrics


def _better_pairs(ranks: Array, mask: Array) -> Array:
    """``[B, K, K] bool``: (w, l) where response w is ranked strictly better than l (lower
    rank), both real. Ties (equal ranks) and padded responses form no pair."""
    real = mask[:, :, None] & mask[:, None, :]
    return real & (ranks[:, :, None] < ranks[:, None, :])


def prompts_with_pairs(ranks: Array, mask: Array) -> Array:
    """How many prompts of ``[B, K]`` comparisons have at least one ordered pair."""
    return jnp.sum(jnp.any(_better_pairs(ranks, mask), axis=(1, 2)).astype(jnp.float32))


# ---------------------------------------------------------------- preferences: the RM and DPO
# B prompts, K responses each, scored per response (``scores [B, K] f32``: the RM's rewards,
# DPO's log-ratios); ``ranks [B, K] int32`` (0 = best, equal = tie), ``mask [B, K] bool`` (real
# responses: K varies by prompt). Every ordered pair (w ranked strictly better than l, both
# real) is a term; a prompt's loss is the mean over its pairs, the batch's the mean over the
# prompts that have one (``denominator`` overrides that count, for micro-batches).

PREFERENCE_KINDS = ("sigmoid", "ipo", "plackett_luce")


def _plackett_luce_nll(utilities: Array, ranks: Array, mask: Array) -> Array:
    """``[B]``: ``sum_k [log sum_{j not ranked better than k} exp(u_j) - u_k]`` over real k."""
    at_risk = mask[:, None, :] & (ranks[:, None, :] >= ranks[:, :, None])  # [B, k, j]
    at_risk = at_risk | jnp.eye(mask.shape[1], dtype=bool)  # a padded k's own term: 0, finite gradient
    log_denominators = jax.nn.logsumexp(jnp.where(at_risk, utilities[:, None, :], -jnp.inf), axis=-1)
    return jnp.sum((log_denominators - utilities) * mask, axis=1)


def preference_loss(scores: Array, ranks: Array, mask: Array, kind: str = "sigmoid", beta: float = 1.0,
                    label_smoothing: float = 0.0,
                    denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The K-wise preference loss over any per-response scores (shapes above).

    - ``sigmoid``: per pair ``-log sigmoid(z)``, ``z = beta * (s_w - s_l)``; with
      ``label_smoothing`` e (cDPO: each label wrong with probability e)
      ``-(1 - e) log sigmoid(z) - e log sigmoid(-z)``. On rewards with beta 1 this is
      InstructGPT's reward-model loss; on log-ratios, DPO.
    - ``ipo``: per pair ``(s_w - s_l - 1 / (2 beta))^2`` (Azar et al. 2023).
    - ``plackett_luce``: per prompt, the negative log-likelihood of its ranking under a
      Plackett-Luce model with utilities ``beta * s`` (the DPO paper's listwise form): the
      best of all, then the best of the rest, ... ``sum_k [log sum_{j not better than k}
      exp(beta s_j) - beta s_k]``, summed over the prompt's responses (so a frozen policy
      gives log K! on a full ranking, and K = 2 is the sigmoid loss). Ties are expanded by
      Breslow's rule: a tied response is picked against every response not ranked better,
      its ties included (on a full ranking this is exactly Plackett-Luce).
    """
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"preference kind {kind!r}: expected one of {PREFERENCE_KINDS}")
    if label_smoothing and kind != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing} applies to the sigmoid loss only, not {kind!r}")
    pairs = _better_pairs(ranks, mask).astype(jnp.float32)
    margins = scores[:, :, None] - scores[:, None, :]  # [B, K, K]: s_w - s_l
    pairs_per_prompt = jnp.sum(pairs, axis=(1, 2))
    if kind == "plackett_luce":
        per_prompt = _plackett_luce_nll(beta * scores, ranks, mask)
    else:
        if kind == "ipo":
            per_pair = jnp.square(margins - 1.0 / (2.0 * beta))
        else:
            z = margins if beta == 1.0 else beta * margins  # the RM's loss, op for op as it always was
            per_pair = -jax.nn.log_sigmoid(z)
            if label_smoothing:
                per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * jax.nn.log_sigmoid(-z)
        per_prompt = jnp.sum(per_pair * pairs, axis=(1, 2)) / jnp.maximum(pairs_per_prompt, 1.0)
    has_pairs = (pairs_per_prompt > 0).astype(jnp.float32)
    loss = masked_mean(per_prompt, has_pairs, denominator)
    _, accuracy_metrics = pairwise_accuracy(scores, ranks, mask)
    metrics = {  # over this batch alone, whatever ``denominator`` is
        "loss": masked_mean(per_prompt, has_pairs),
        **accuracy_metrics,
        "margin": masked_mean(margins, pairs),
        "reward_mean": masked_mean(scores, mask),
        "prompts_with_pairs": jnp.sum(has_pairs),
    }
    return loss, metrics


def ranking_loss(rewards: Array, ranks: Array, mask: Array,
                 denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """InstructGPT's K-wise reward-model loss, all C(K, 2) pairs of a prompt in one element:
    per prompt, the mean over its ordered pairs of ``-log sigmoid(r_w - r_l)``, then the mean
    over prompts (:func:`preference_loss` on rewards ``[B, K] f32``, sigmoid, beta 1)."""
    return preference_loss(rewards, ranks, mask, "sigmoid", 1.0, 0.0, denominator)


def dpo_loss(policy_logps: Array, ref_logps: Array, ranks: Array, mask: Array, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0,
             denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """DPO (``sigmoid``), IPO (``ipo``) or listwise DPO (``plackett_luce``) on K-wise rankings:
    :func:`preference_loss` over each response's log-ratio ``log pi(y|x) - log pi_ref(y|x)``.

    policy_logps, ref_logps: ``[B, K] f32``, each response's summed log-probs under the
    policy and the frozen reference; ranks, mask: ``[B, K]`` as the RM's. Chosen/rejected
    rows are K = 2. Metrics add the implicit reward ``beta * log-ratio``: its mean over
    responses (``reward_mean``) and its mean margin over pairs (``reward_margin``).
    """
    log_ratios = jnp.where(mask, policy_logps - ref_logps, 0.0)
    loss, metrics = preference_loss(log_ratios, ranks, mask, kind, beta, label_smoothing, denominator)
    metrics = {**metrics, "log_ratio_mean": metrics["reward_mean"], "reward_mean": beta * metrics["reward_mean"],
               "reward_margin": beta * metrics["margin"]}
    return loss, metrics


def pairwise_accuracy(rewards: Array, ranks: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
    """Fraction of ordered pairs (over the batch) where the better response gets the higher
    reward; a reward tie counts half. Shapes as in :func:`preference_loss`."""
    pairs = _better_pairs(ranks, mask).astype(jnp.float32)
    margins = rewards[:, :, None] - rewards[:, None, :]
    right = jnp.where(margins > 0, 1.0, jnp.where(margins == 0, 0.5, 0.0))
    accuracy = masked_mean(right, pairs)
    return accuracy, {"accuracy": accuracy, "pairs": jnp.sum(pairs)}


def win_outcomes(scores: Array, baseline_scores: Array) -> Array:
    """``[N]`` 1 where ``scores`` beat ``baseline_scores`` (both ``[N]``, e.g. gold scores of
    two policies' responses to the same prompts), 0.5 on a tie, 0 where they lose."""
    return jnp.where(scores > baseline_scores, 1.0, jnp.where(scores == baseline_scores, 0.5, 0.0))


def win_rate(scores: Array, baseline_scores: Array) -> Array:
    """Fraction of prompts where ``scores`` beat ``baseline_scores`` (both ``[N]``); a tie
    counts half: the mean of :func:`win_outcomes`."""
    return jnp.mean(win_outcomes(scores, baseline_scores))


def stderr_over_prompts(values: Array, n_prompts: int) -> Array:
    """Standard error of the mean of ``values`` ``[D * n_prompts]``, D draws for each prompt,
    draw after draw (row ``d * n_prompts + i``). Draws of one prompt are not independent (the
    prompt sets how hard it is), so the prompts are the sample: each prompt's mean over its
    draws, their standard deviation (ddof 1) over ``sqrt(n_prompts)``. NaN for one prompt."""
    per_prompt = jnp.mean(values.reshape(-1, n_prompts), axis=0)
    return jnp.std(per_prompt, ddof=1) / jnp.sqrt(n_prompts)


def best_of_n(rewards: Array, gold: Array) -> tuple[Array, dict[str, Array]]:
    """Best-of-n selection by a reward model, judged by a gold scorer: ``rewards`` and
    ``gold`` are ``[N, B]``, N sampled responses to each of B prompts. Returns the mean gold
    score of the response the reward model ranks first (ties: the first such sample), with
    the mean gold score of one sample (what picking at random gives on average) and of the
    gold-best sample (a perfect reward model's pick). A reward model that helps PPO must at
    least pick better than at random among the policy's own samples."""
    columns = jnp.arange(gold.shape[1])
    picked = jnp.mean(gold[jnp.argmax(rewards, axis=0), columns])
    return picked, {"rm_pick_gold": picked, "random_gold": jnp.mean(gold),
                    "oracle_gold": jnp.mean(jnp.max(gold, axis=0))}


def best_of_n_pick(scores: Array) -> Array:
    """``[B] int32``: which of N samples best-of-n keeps for each of B prompts, the
    highest-scoring (``scores [N, B]``; ties: the first)."""
    return jnp.argmax(scores, axis=0).astype(jnp.int32)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi) = log n - (n - 1) / n: the analytic KL of picking the best of n
    samples of pi by any score without ties (Stiennon et al. 2020; Gao et al. 2022 plot
    best-of-n against it). 0 at n = 1."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------- PPO and PPO-ptx
# Shapes: B episodes, T response positions. ``mask`` ``[B, T]`` marks the response tokens
# (right-padded: each row's tokens come first). Log-probs are of the sampled tokens.

KLKind = str  # "k1" | "k2" | "k3"


def kl_estimate(logp: Array, ref_logp: Array, kind: KLKind = "k1") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

    logp, ref_logp: ``[B, T] f32`` -> ``[B, T] f32``. With ``log_ratio = logp - ref_logp``:
    k1 = log_ratio (unbiased, can be negative); k2 = log_ratio^2 / 2 (biased, low variance);
    k3 = exp(-log_ratio) - 1 + log_ratio (unbiased, always >= 0). All are 0 when pi == pi_ref.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl kind {kind!r}: expected 'k1', 'k2' or 'k3'")


def last_token_mask(mask: Array) -> Array:
    """``[B, T] bool``: the last True of each (right-padded) row of ``mask``."""
    mask = mask.astype(bool)
    next_is_real = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return mask & ~next_is_real


def kl_shaped_rewards(logp: Array, ref_logp: Array, scores: Array, mask: Array, beta: Array | float,
                      kind: KLKind = "k1") -> tuple[Array, dict[str, Array]]:
    """InstructGPT's per-token reward: ``r_t = -beta * KL_t``, plus the episode's score at
    its last response token.

    logp, ref_logp: ``[B, T] f32``; scores: ``[B] f32`` (RM score, penalties included);
    mask: ``[B, T]``. Returns (rewards ``[B, T] f32``, metrics).
    """
    mask = mask.astype(jnp.float32)
    kl = kl_estimate(logp, ref_logp, kind) * mask
    rewards = -beta * kl + scores[:, None] * last_token_mask(mask)
    kl_per_episode = jnp.sum(kl, axis=1)
    metrics = {
        "kl_to_ref": jnp.mean(kl_per_episode),  # summed over the response, mean over episodes
        "kl_penalty": -beta * jnp.mean(kl_per_episode),
        "beta": jnp.asarray(beta, jnp.float32),
    }
    return rewards, metrics


def gae(rewards: Array, values: Array, mask: Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
    """Generalised advantage estimation over each row's response tokens.

    rewards, values: ``[B, T] f32``; mask: ``[B, T]`` (right-padded). The value after a
    row's last token is 0 (the episode ends). Returns (advantages, returns), ``[B, T]``,
    0 outside the mask; ``returns = advantages + values`` are the value targets.
    """
    mask = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def backwards(carry, xs):
        delta, cont = xs
        advantage = delta + gamma * lam * cont * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(backwards, jnp.zeros_like(deltas[:, 0]),
                                 (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Normalise ``x`` to unit variance (and zero mean) over ``mask``; 0 outside it."""
    mask = mask.astype(jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip: float = 0.2,
                    denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate: mean over tokens of ``max(-A * ratio, -A * clip(ratio, 1-e, 1+e))``.

    logp (current policy), old_logp (at rollout), advantages, mask: ``[B, T]``.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask, denominator)
    metrics = {
        "policy_loss": loss,
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask, denominator),
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask, denominator),
        "ratio": masked_mean(ratio, mask, denominator),
    }
    return loss, metrics


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float = 0.2,
               denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clipped - R)^2)``, where V_clipped stays
    within ``clip`` of the rollout's values. All ``[B, T]``."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    unclipped_error = jnp.square(values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), mask, denominator)
    metrics = {
        "loss": loss,
        "clipfrac": masked_mean((clipped_error > unclipped_error).astype(jnp.float32), mask, denominator),
        "mean": masked_mean(values, mask, denominator),
    }
    return loss, metrics


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """``1 - Var[R - V] / Var[R]`` over the mask: 1 is a perfect value function, 0 a constant."""
    mask = mask.astype(jnp.float32)
    residual = returns - values
    var_returns = masked_mean(jnp.square(returns - masked_mean(returns, mask)), mask)
    var_residual = masked_mean(jnp.square(residual - masked_mean(residual, mask)), mask)
    return 1.0 - var_residual / jnp.maximum(var_returns, 1e-8)


def token_entropy(logits: Array) -> Array:
    """``[...] f32``: the entropy of each softmax distribution of logits ``[..., V] f32``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy(logits: Array, mask: Array, denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Mean entropy of the policy's next-token distributions over the mask.

    logits: ``[B, T, V] f32``; mask: ``[B, T]``.
    """
    return entropy_from_terms(token_entropy(logits), mask, denominator)


def entropy_from_terms(per_token: Array, mask: Array, denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """:func:`entropy` from each position's entropy ``[B, T] f32`` (e.g. the ``entropy`` of
    :func:`chunked_next_token_terms`)."""
    value = masked_mean(per_token, mask, denominator)
    return value, {"entropy": value}


def normalization_stats(rewards: Array, mask: Array) -> tuple[Array, Array]:
    """(mean, std) of ``rewards`` ``[N]`` over ``mask`` ``[N]``: the offset and scale that
    make the reward model's demonstrations score mean 0 (and std 1)."""
    mean = masked_mean(rewards, mask)
    return mean, jnp.sqrt(masked_mean(jnp.square(rewards - mean), mask))


def ptx_loss(logits: Array, tokens: Array, loss_mask: Array,
             denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The pretraining term of PPO-ptx: next-token NLL on pretraining text (shapes as
    :func:`sft_loss`); minimising it maximises ``E_pretrain[log pi(x)]``."""
    return ptx_loss_from_terms(*_next_token_terms(logits, tokens), loss_mask, denominator)


def ptx_loss_from_terms(logprobs: Array, is_top: Array, loss_mask: Array,
                        denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """:func:`ptx_loss` from the next-token terms (as :func:`sft_loss_from_terms`)."""
    loss, metrics = sft_loss_from_terms(logprobs, is_top, loss_mask, denominator)
    return loss, {"loss": loss, "accuracy": metrics["accuracy"]}


def ppo_objective(policy_loss: Array, entropy_value: Array, ptx: Array, *, entropy_coef: float,
                  ptx_coef: float) -> tuple[Array, dict[str, Array]]:
    """The policy's loss: ``policy_loss - entropy_coef * entropy + ptx_coef * ptx``.

    (InstructGPT: ``ptx_coef`` = gamma = 27.8 for PPO-ptx, 0 for plain PPO. With 0 the ptx
    term contributes exactly nothing, not even a zero-times-NaN.)
    """
    terms = {"objective/policy": policy_loss, "objective/entropy": -entropy_coef * entropy_value}
    if ptx_coef:
        terms["objective/ptx"] = ptx_coef * ptx
    total = sum(terms.values())
    return total, {**terms, "objective/total": total}


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. (2019): move beta so the observed KL tracks ``target``.

    ``update`` is pure: ``beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``
    where ``observed_kl`` is the batch's mean per-episode KL and ``n_steps`` the episodes
    since the last update.
    """

    target: float
    horizon: float

    def update(self, beta: Array, observed_kl: Array, n_steps: int) -> Array:
        error = jnp.clip(observed_kl / self.target - 1.0, -0.2, 0.2)
        return beta * (1.0 + error * n_steps / self.horizon)


# ---------------------------------------------------------------- RLOO and GRPO: groups of samples
# P prompts, G sampled responses each; episodes are rows ``[B = P * G]`` with a prompt's G
# rows adjacent (``x.reshape(P, G)``). Per-token shapes as PPO's: ``[B, T]``, ``mask`` the
# response tokens. No value model: a response's advantage compares it with its group.

ADVANTAGE_KINDS = ("rloo", "grpo", "dr_grpo")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "constant")


def group_advantages(rewards: Array, mask: Array, kind: str, eps: float = 1e-4) -> tuple[Array, dict[str, Array]]:
    """Each response's advantage within its prompt's group: rewards, mask ``[P, G]`` (mask:
    real responses) -> advantages ``[P, G] f32``, 0 where masked.

    - ``rloo``: ``r_i - mean_{j != i} r_j`` (Ahmadian et al. 2024: the leave-one-out baseline,
      unbiased); ``n / (n - 1) * (r_i - mean)`` for n real responses; 0 alone.
    - ``grpo``: ``(r_i - mean) / (std + eps)``, std the sample (n - 1) standard deviation
      (Shao et al. 2024).
    - ``dr_grpo``: ``r_i - mean``, no std (Liu et al. 2025: the std favours groups that agree).
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"advantage kind {kind!r}: expected one of {ADVANTAGE_KINDS}")
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask, axis=1, keepdims=True)
    mean = jnp.sum(rewards * mask, axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = (rewards - mean) * mask
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / jnp.maximum(count - 1.0, 1.0))
    if kind == "rloo":
        advantages = centred * count / jnp.maximum(count - 1.0, 1.0)
    elif kind == "grpo":
        advantages = centred / (std + eps)
    else:
        advantages = centred
    has_group = (count[:, 0] > 0).astype(jnp.float32)
    metrics = {"group_reward_std": masked_mean(std[:, 0], has_group),
               "zero_std_groups": masked_mean((std[:, 0] == 0).astype(jnp.float32), has_group)}
    return advantages * mask, metrics


def aggregate(per_token: Array, mask: Array, aggregation: str) -> Array:
    """A per-token loss ``[B, T]`` reduced over the mask: ``seq_mean_token_mean`` (each
    response's token mean, then the mean over responses: the GRPO paper), ``token_mean``
    (every token of the batch alike: DAPO) or ``constant`` (the sum over ``B * T``, T the
    length budget: Dr. GRPO, which no response length biases)."""
    mask = mask.astype(jnp.float32)
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "seq_mean_token_mean":
        return jnp.mean(jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    if aggregation == "constant":
        return masked_sum(per_token, mask) / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"aggregation {aggregation!r}: expected one of {AGGREGATIONS}")


def grpo_loss(logp: Array, old_logp: Array, ref_logp: Array, advantages: Array, mask: Array,
              clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.04,
              aggregation: str = "seq_mean_token_mean") -> tuple[Array, dict[str, Array]]:
    """GRPO's loss: per token, the clipped surrogate ``max(-A r, -A clip(r, 1 - clip_low,
    1 + clip_high))`` (``r = pi / pi_old``; DAPO's clip-higher when clip_high > clip_low) plus
    ``kl_coef`` times the k3 estimate of KL(pi || pi_ref), reduced by :func:`aggregate`.

    logp (current), old_logp (sampling), ref_logp: ``[B, T] f32``, at the sampling
    temperature; advantages: ``[B] f32`` (one per response, e.g. :func:`group_advantages`);
    mask: ``[B, T]``.
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp((logp - old_logp) * mask)
    adv = advantages[:, None]
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    surrogate = jnp.maximum(unclipped, clipped)
    kl = kl_estimate(logp, ref_logp, "k3")
    per_token = surrogate + kl_coef * kl if kl_coef else surrogate
    loss = aggregate(per_token, mask, aggregation)
    metrics = {"policy_loss": aggregate(surrogate, mask, aggregation),
               "kl_k3": aggregate(kl, mask, aggregation),
               "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
               "ratio": masked_mean(ratio, mask)}
    return loss, metrics


def kl_penalized_scores(logp: Array, ref_logp: Array, scores: Array, mask: Array, beta: Array | float,
                        kind: KLKind = "k1") -> tuple[Array, dict[str, Array]]:
    """RLOO's reward: each episode's score ``[B]`` minus ``beta`` times its summed per-token
    KL estimate (logp, ref_logp, mask ``[B, T]``): the KL as a reward penalty, what
    :func:`kl_shaped_rewards` spreads over tokens, in one number per sequence."""
    kl_per_episode = jnp.sum(kl_estimate(logp, ref_logp, kind) * mask.astype(jnp.float32), axis=1)
    metrics = {"kl_to_ref": jnp.mean(kl_per_episode), "kl_penalty": -beta * jnp.mean(kl_per_episode),
               "beta": jnp.asarray(beta, jnp.float32)}
    return scores - beta * kl_per_episode, metrics


def rloo_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array,
              clip: float | None = None) -> tuple[Array, dict[str, Array]]:
    """RLOO's policy loss (Ahmadian et al. 2024, TRL's form): REINFORCE on each response's
    summed log-prob with its advantage, ``mean_b(-A_b * R_b)``, ``R_b = exp(sum_t (logp -
    old_logp))`` the sequence's probability ratio (1 on the batch it was sampled for, where
    the gradient is exactly REINFORCE's ``-A_b * grad sum_t logp``); ``clip`` bounds R as
    PPO's surrogate does, for further passes over the same batch.

    logp, old_logp, mask: ``[B, T]``; advantages: ``[B] f32``.
    """
    mask = mask.astype(jnp.float32)
    log_ratio = jnp.sum((logp - old_logp) * mask, axis=1)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    per_episode = unclipped
    if clip is not None:
        per_episode = jnp.maximum(unclipped, -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    loss = jnp.mean(per_episode)
    metrics = {"policy_loss": loss, "clipfrac": jnp.mean((per_episode > unclipped).astype(jnp.float32)),
               "ratio": jnp.mean(ratio), "approx_kl": jnp.mean(jnp.expm1(-log_ratio) + log_ratio)}
    return loss, metrics
