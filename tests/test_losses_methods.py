"""losses.py beyond PPO: DPO / IPO / Plackett-Luce, group advantages, GRPO and RLOO, each
against an independent reference (Python loops over pairs, orderings and tokens; worked
examples; finite differences)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from tests.helpers import F32_EPS, f32_rtol


# A closed form against an f32 computation of a few ops (a log, an exp, a sum of a few terms)
CLOSED_FORM = f32_rtol(4, ops=6)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _loop_preference_loss(scores, ranks, mask, kind, beta, smoothing=0.0):
    """Pairs by Python loops: per prompt the mean over its ordered pairs, then the mean over
    prompts with a pair (sigmoid, ipo); Plackett-Luce by its product of choices."""
    per_prompt = []
    for b in range(scores.shape[0]):
        real = [k for k in range(scores.shape[1]) if mask[b, k]]
        pairs = [(w, l) for w, l in itertools.permutations(real, 2) if ranks[b, w] < ranks[b, l]]
        if not pairs:
            continue
        if kind == "plackett_luce":  # each response picked among those not ranked better (Breslow)
            per_prompt.append(sum(
                math.log(sum(math.exp(beta * scores[b, j]) for j in real if ranks[b, j] >= ranks[b, k]))
                - beta * scores[b, k] for k in real))
            continue
        terms = []
        for w, l in pairs:
            h = scores[b, w] - scores[b, l]
            if kind == "ipo":
                terms.append((h - 1 / (2 * beta)) ** 2)
            else:
                terms.append(-(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h))
        per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def _random_rankings(seed, b=10, k=6, distinct_ranks=3):
    rng = np.random.default_rng(seed)
    policy, ref = rng.normal(size=(b, k)) * 3 - 20, rng.normal(size=(b, k)) * 3 - 20
    ranks = rng.integers(0, distinct_ranks, size=(b, k))
    mask = np.arange(k)[None, :] < rng.integers(2, k + 1, size=b)[:, None]
    ranks[0] = 1  # a prompt whose responses all tie: no pair, left out of the mean
    return policy, ref, ranks, mask


@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0),
                                             ("plackett_luce", 0.0)])
def test_dpo_loss_equals_loops_over_pairs_with_ties_masks_and_varying_k(kind, smoothing):
    policy, ref, ranks, mask = _random_rankings(0)
    beta = 0.3
    loss, metrics = losses.dpo_loss(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32),
                                    jnp.asarray(ranks), jnp.asarray(mask), beta, kind, smoothing)
    expected = _loop_preference_loss(policy - ref, ranks, mask, kind, beta, smoothing)
    # A pair's log-ratio difference h = (p_w - r_w) - (p_l - r_l) of inputs of magnitude m is off by 7 m eps
    # (4 inputs rounded to f32, 3 subtractions); a loss term moves by its slope times that: beta for sigmoid
    # and each of Plackett-Luce's K terms, 2 |h - 1/(2 beta)| for IPO; the means add f32_rtol(pairs).
    m, k = max(np.abs(policy).max(), np.abs(ref).max()), policy.shape[1]
    h = np.abs(policy - ref).max() * 2
    slope = {"sigmoid": beta, "plackett_luce": beta * k, "ipo": 2 * (h + 1 / (2 * beta))}[kind]
    tolerance = slope * 7 * m * F32_EPS + f32_rtol(k * k, ops=4) * abs(expected)
    np.testing.assert_allclose(float(loss), expected, rtol=0, atol=tolerance)
    with_pairs = sum(any(mask[b, w] and mask[b, l] and ranks[b, w] < ranks[b, l]
                         for w, l in itertools.permutations(range(6), 2)) for b in range(10))
    assert float(metrics["prompts_with_pairs"]) == with_pairs < 10  # the all-tie prompt is left out


def test_padded_responses_change_nothing():
    policy, ref, ranks, mask = _random_rankings(1)
    garbage_policy = np.where(mask, policy, 1e4)  # what a padded row's log-probs might be
    for kind in losses.PREFERENCE_KINDS:
        clean = losses.dpo_loss(jnp.asarray(policy * mask), jnp.asarray(ref * mask), jnp.asarray(ranks),
                                jnp.asarray(mask), 0.5, kind)[0]
        dirty = losses.dpo_loss(jnp.asarray(garbage_policy), jnp.asarray(ref), jnp.asarray(ranks),
                                jnp.asarray(mask), 0.5, kind)[0]
        assert float(dirty) == float(clean), kind  # a masked response's log-ratio is set to 0 before any use


def test_plackett_luce_at_k2_is_sigmoid_dpo():
    rng = np.random.default_rng(2)
    policy, ref = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32), jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    ranks = jnp.asarray(np.stack([rng.permutation(2) for _ in range(16)]))
    mask = jnp.ones((16, 2), bool)
    for beta in (0.1, 1.0, 2.5):
        pl = losses.dpo_loss(policy, ref, ranks, mask, beta, "plackett_luce")[0]
        sigmoid = losses.dpo_loss(policy, ref, ranks, mask, beta, "sigmoid")[0]
        # two formulas for log(1 + e^-z): a logsumexp and a log-sigmoid, a few roundings each
        np.testing.assert_allclose(float(pl), float(sigmoid), rtol=f32_rtol(2, ops=6))


def test_a_frozen_policy_gives_log_2_and_log_k_factorial():
    """policy == reference: every log-ratio is 0, so sigmoid DPO is -log sigmoid(0) = log 2,
    Plackett-Luce on a full ranking of K is log K! (1 / K! is the chance of any order), and
    IPO is (1 / (2 beta))^2."""
    for k in (2, 4, 7):
        logps = jnp.asarray(np.random.default_rng(k).normal(size=(3, k)), jnp.float32)
        ranks = jnp.asarray(np.stack([np.random.default_rng(k + i).permutation(k) for i in range(3)]))
        mask = jnp.ones((3, k), bool)
        np.testing.assert_allclose(float(losses.dpo_loss(logps, logps, ranks, mask, 0.1, "sigmoid")[0]),
                                   math.log(2), rtol=CLOSED_FORM)
        np.testing.assert_allclose(float(losses.dpo_loss(logps, logps, ranks, mask, 0.1, "plackett_luce")[0]),
                                   math.log(math.factorial(k)), rtol=CLOSED_FORM)
        np.testing.assert_allclose(float(losses.dpo_loss(logps, logps, ranks, mask, 0.1, "ipo")[0]), 25.0, rtol=CLOSED_FORM)


def test_plackett_luce_worked_example_and_its_tie_rule():
    # utilities (beta 1) u = (2, 0, 1) ranked 0 > 2 > 1:
    # -log[e^2 / (e^2 + e^0 + e^1)] - log[e^1 / (e^1 + e^0)] - log[e^0 / e^0]
    scores = jnp.array([[2.0, 0.0, 1.0]])
    full = losses.preference_loss(scores, jnp.array([[0, 2, 1]]), jnp.ones((1, 3), bool), "plackett_luce")[0]
    e = math.e
    expected = -math.log(e ** 2 / (e ** 2 + 1 + e)) - math.log(e / (e + 1))  # 0.4076 + 0.3133
    np.testing.assert_allclose(float(full), expected, rtol=CLOSED_FORM)
    # responses 1 and 2 tie (rank 1): each is picked against both (Breslow), the last term is no longer 0
    tied = losses.preference_loss(scores, jnp.array([[0, 1, 1]]), jnp.ones((1, 3), bool), "plackett_luce")[0]
    expected_tied = -math.log(e ** 2 / (e ** 2 + 1 + e)) - math.log(e / (e + 1)) - math.log(1 / (e + 1))
    np.testing.assert_allclose(float(tied), expected_tied, rtol=CLOSED_FORM)


def test_swapping_chosen_and_rejected_flips_the_margin():
    policy, ref = jnp.array([[-3.0, -5.0]]), jnp.array([[-4.0, -4.0]])  # log-ratios (1, -1): margin 2
    mask = jnp.ones((1, 2), bool)
    right = losses.dpo_loss(policy, ref, jnp.array([[0, 1]]), mask, 0.5)
    wrong = losses.dpo_loss(policy, ref, jnp.array([[1, 0]]), mask, 0.5)
    np.testing.assert_allclose(float(right[0]), -_log_sigmoid(1.0), rtol=CLOSED_FORM)  # beta * margin = 1
    np.testing.assert_allclose(float(wrong[0]), -_log_sigmoid(-1.0), rtol=CLOSED_FORM)
    assert float(right[1]["accuracy"]) == 1.0 and float(wrong[1]["accuracy"]) == 0.0
    np.testing.assert_allclose(float(right[1]["reward_margin"]), 1.0, rtol=CLOSED_FORM)


def test_label_smoothing_is_refused_where_it_means_nothing():
    args = (jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([[0, 1]]), jnp.ones((1, 2), bool), 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(*args, "ipo", 0.1)
    with pytest.raises(ValueError, match="'hinge'"):
        losses.dpo_loss(*args, "hinge")


def _central_differences(f, x, h=1e-6):
    """df/dx of a scalar function of a float64 array, entry by entry."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                             ("plackett_luce", 0.0)])
def test_dpo_gradient_matches_finite_differences(kind, smoothing):
    policy, ref, ranks, mask = _random_rankings(3, b=4, k=4)
    policy, ref = policy + 19, ref + 19  # log-ratios of order 1, where every term has curvature
    with jax.enable_x64(True):
        @jax.jit
        def f(p):
            return losses.dpo_loss(jnp.asarray(p), jnp.asarray(ref), jnp.asarray(ranks), jnp.asarray(mask), 0.7,
                                   kind, smoothing)[0]
        grad = np.asarray(jax.grad(f)(jnp.asarray(policy)))
        # f64, h = 1e-6: truncation ~h^2 * f''' ~ 1e-12, rounding ~eps / h ~ 1e-10
        np.testing.assert_allclose(grad, _central_differences(lambda p: float(f(p)), policy), atol=1e-8)
    assert np.abs(grad).max() > 1e-3  # a real gradient, not an all-zero one


# ------------------------------------------------------------------ group advantages

def test_group_advantages_on_the_worked_example():
    # rewards [1, 0, 0, 1]: mean 0.5; leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - 2/3;
    # sample std sqrt((4 * 0.25) / 3) = 0.57735, so GRPO gives +-0.5 / 0.57735 = +-0.8660
    rewards, mask = jnp.array([[1.0, 0.0, 0.0, 1.0]]), jnp.ones((1, 4), bool)
    sign = np.array([[1, -1, -1, 1]])
    rloo, _ = losses.group_advantages(rewards, mask, "rloo")
    np.testing.assert_allclose(rloo, sign * 2 / 3, rtol=CLOSED_FORM)
    grpo, metrics = losses.group_advantages(rewards, mask, "grpo", eps=0.0)
    np.testing.assert_allclose(grpo, sign * 0.5 / math.sqrt(1 / 3), rtol=CLOSED_FORM)
    np.testing.assert_allclose(float(metrics["group_reward_std"]), math.sqrt(1 / 3), rtol=CLOSED_FORM)
    dr, _ = losses.group_advantages(rewards, mask, "dr_grpo")
    np.testing.assert_allclose(dr, sign * 0.5, rtol=CLOSED_FORM)


def test_group_advantages_equal_loops_with_masked_members():
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=(6, 5))
    mask = rng.random((6, 5)) < 0.8
    mask[0] = [True, False, False, False, False]  # one real member: no baseline to compare with
    mask[1] = True
    for kind in losses.ADVANTAGE_KINDS:
        ours, _ = losses.group_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(mask), kind, eps=1e-4)
        expected = np.zeros_like(rewards)
        for p, g in zip(*np.nonzero(mask)):
            group = [rewards[p, j] for j in range(5) if mask[p, j]]
            others = [rewards[p, j] for j in range(5) if mask[p, j] and j != g]
            mean = np.mean(group)
            if kind == "rloo":
                expected[p, g] = rewards[p, g] - np.mean(others) if others else 0.0
            elif kind == "grpo":
                std = np.std(group, ddof=1) if len(group) > 1 else 0.0
                expected[p, g] = (rewards[p, g] - mean) / (std + 1e-4)
            else:
                expected[p, g] = rewards[p, g] - mean
        # a group's mean and std are f32 sums of <= 5 rewards (|r| < 4) and a sqrt, then one division
        np.testing.assert_allclose(ours, expected, rtol=f32_rtol(5, 5, ops=4), atol=f32_rtol(5, 5, ops=4) * 4,
                                   err_msg=kind)


# ------------------------------------------------------------------ GRPO and RLOO losses

def _episodes(seed, b=6, t=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    logp = -rng.random((b, t)) * 3
    return logp, rng.normal(size=b), mask


def _loop_grpo_loss(logp, old, ref, adv, mask, clip_low, clip_high, kl_coef, aggregation):
    b, t = logp.shape
    per_token = np.zeros((b, t))
    for i, j in itertools.product(range(b), range(t)):
        ratio = math.exp(logp[i, j] - old[i, j])
        surrogate = max(-adv[i] * ratio, -adv[i] * min(max(ratio, 1 - clip_low), 1 + clip_high))
        k3 = math.exp(ref[i, j] - logp[i, j]) - (ref[i, j] - logp[i, j]) - 1
        per_token[i, j] = (surrogate + kl_coef * k3) * mask[i, j]
    if aggregation == "token_mean":
        return per_token.sum() / mask.sum()
    if aggregation == "seq_mean_token_mean":
        return np.mean(per_token.sum(1) / mask.sum(1))
    return per_token.sum() / (b * t)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_grpo_loss_equals_a_loop_over_tokens(aggregation):
    logp, adv, mask = _episodes(5)
    rng = np.random.default_rng(6)
    old, ref = logp + rng.normal(size=logp.shape) * 0.3, logp + rng.normal(size=logp.shape) * 0.3
    loss, metrics = losses.grpo_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)),
                                     clip_low=0.2, clip_high=0.28, kl_coef=0.05, aggregation=aggregation)
    expected = _loop_grpo_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.05, aggregation)
    # f32 sums over <= 30 tokens of terms with an exp each, relative to the terms' magnitude (|A| r <= 5)
    np.testing.assert_allclose(float(loss), expected, rtol=0, atol=f32_rtol(30, ops=6) * 5)
    assert 0 < float(metrics["clipfrac"]) < 1  # both sides of the clip occur in this batch


def test_grpo_with_ratio_one_and_no_kl_is_minus_the_mean_advantage():
    logp, adv, mask = _episodes(7)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, logp, logp, adv, mask)]
    token_mean, metrics = losses.grpo_loss(*args, kl_coef=0.0, aggregation="token_mean")
    lengths = mask.sum(1)  # token-mean: each response's advantage weighted by its length
    np.testing.assert_allclose(float(token_mean), -np.sum(adv * lengths) / lengths.sum(), rtol=CLOSED_FORM)
    seq_mean, _ = losses.grpo_loss(*args, kl_coef=0.0, aggregation="seq_mean_token_mean")
    np.testing.assert_allclose(float(seq_mean), -np.mean(adv), rtol=CLOSED_FORM)
    assert float(metrics["clipfrac"]) == 0.0 and float(metrics["ratio"]) == 1.0
    # k3 at logp = ref is exactly 0, so a KL coefficient changes nothing there
    with_kl, kl_metrics = losses.grpo_loss(*args, kl_coef=0.5, aggregation="token_mean")
    assert float(with_kl) == float(token_mean) and float(kl_metrics["kl_k3"]) == 0.0


def test_grpo_clip_higher_bounds_the_ratio_asymmetrically():
    # one token, A = +1: ratio e^0.5 = 1.65 is capped at 1 + clip_high; A = -1, ratio e^-0.5 = 0.61
    # is capped at 1 - clip_low; neither has a gradient then
    one, zero = jnp.ones((1, 1)), jnp.zeros((1, 1))
    up = losses.grpo_loss(0.5 * one, zero, zero, jnp.array([1.0]), one, 0.2, 0.28, 0.0, "token_mean")[0]
    np.testing.assert_allclose(float(up), -1.28, rtol=CLOSED_FORM)
    down = losses.grpo_loss(-0.5 * one, zero, zero, jnp.array([-1.0]), one, 0.2, 0.28, 0.0, "token_mean")[0]
    np.testing.assert_allclose(float(down), 0.8, rtol=CLOSED_FORM)
    grad = jax.grad(lambda lp: losses.grpo_loss(lp, zero, zero, jnp.array([1.0]), one, 0.2, 0.28, 0.0,
                                                "token_mean")[0])(0.5 * one)
    assert float(grad[0, 0]) == 0.0


def test_rloo_loss_at_ratio_one_is_reinforce_with_the_given_advantages():
    """On the batch it was sampled for (logp = old_logp), the loss is -mean(A) and its
    gradient is REINFORCE's: d/d logp[b, t] = -A_b / B on each response token, 0 on padding."""
    logp, adv, mask = _episodes(8)
    for clip in (None, 0.2):
        loss, metrics = losses.rloo_loss(jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask),
                                         clip)
        np.testing.assert_allclose(float(loss), -np.mean(adv), rtol=CLOSED_FORM)
        grad = jax.grad(lambda lp: losses.rloo_loss(lp, jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask),
                                                    clip)[0])(jnp.asarray(logp, jnp.float32))
        np.testing.assert_allclose(grad, -adv[:, None] * mask / len(adv), rtol=CLOSED_FORM, atol=1e-8)
        assert float(metrics["clipfrac"]) == 0.0


def test_rloo_clip_stops_the_gradient_past_the_bound():
    # sequence log-ratio 0.1 + 0.2 = 0.3: ratio 1.35 > 1.2 with A > 0: clipped, no gradient
    logp, old, mask = jnp.array([[0.1, 0.2]]), jnp.zeros((1, 2)), jnp.ones((1, 2))
    loss, metrics = losses.rloo_loss(logp, old, jnp.array([2.0]), mask, clip=0.2)
    np.testing.assert_allclose(float(loss), -2.0 * 1.2, rtol=CLOSED_FORM)
    assert float(metrics["clipfrac"]) == 1.0
    assert not np.any(jax.grad(lambda lp: losses.rloo_loss(lp, old, jnp.array([2.0]), mask, 0.2)[0])(logp))


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_grpo_and_rloo_gradients_match_finite_differences(aggregation):
    logp, adv, mask = _episodes(9, b=3, t=4)
    rng = np.random.default_rng(10)
    old, ref = logp + rng.normal(size=logp.shape) * 0.05, logp + rng.normal(size=logp.shape) * 0.5
    with jax.enable_x64(True):
        @jax.jit
        def grpo(lp):
            return losses.grpo_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                    jnp.asarray(mask), 0.2, 0.2, 0.3, aggregation)[0]

        @jax.jit
        def rloo(lp):
            return losses.rloo_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)[0]

        for f in (grpo, rloo):
            grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))
            # f64 central differences, h = 1e-6 (no kink within h of these ratios)
            np.testing.assert_allclose(grad, _central_differences(lambda x: float(f(x)), logp), atol=1e-8)
            assert np.abs(grad).max() > 1e-3


def test_kl_penalized_scores_spend_the_same_kl_as_the_per_token_shaping():
    logp, _, mask = _episodes(11)
    ref = logp - 0.2
    scores = jnp.asarray(np.arange(6.0), jnp.float32)
    penalized, metrics = losses.kl_penalized_scores(jnp.asarray(logp), jnp.asarray(ref), scores, jnp.asarray(mask), 0.1)
    shaped, shaped_metrics = losses.kl_shaped_rewards(jnp.asarray(logp), jnp.asarray(ref), scores, jnp.asarray(mask), 0.1)
    # 0.02 per token, summed over <= 5 tokens in either order, beside a score of up to 5
    np.testing.assert_allclose(penalized, np.sum(shaped, axis=1), rtol=0, atol=f32_rtol(6, ops=4) * 5)
    np.testing.assert_allclose(float(metrics["kl_to_ref"]), float(shaped_metrics["kl_to_ref"]), rtol=CLOSED_FORM)


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n():
    assert losses.best_of_n_kl(1) == 0.0
    np.testing.assert_allclose(losses.best_of_n_kl(2), math.log(2) - 0.5)
    np.testing.assert_allclose(losses.best_of_n_kl(16), math.log(16) - 15 / 16)
