"""losses.py: worked examples, invariants, and loop references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from tests.helpers import assert_f32_close, f32_rtol


# ------------------------------------------------------------------ SFT

def test_sft_loss_ignores_prompt_tokens_and_padding():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 6)))
    # row 0: prompt = positions 0-2, response 3-4, padding 5; row 1: prompt 0-1, response 2-5
    mask = jnp.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]], jnp.float32)
    loss, metrics = losses.sft_loss(logits, tokens, mask)
    # changing prompt tokens *as targets* (positions whose mask is 0) changes nothing
    changed = tokens.at[0, 1].set((tokens[0, 1] + 1) % 11).at[0, 5].set((tokens[0, 5] + 3) % 11)
    changed_logits = logits.at[0, 5].set(100.0)  # logits of the padding position: never read
    assert losses.sft_loss(changed_logits, changed, mask)[0] == loss
    # it is the mean NLL over exactly the 6 target positions
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = [(0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (1, 5)]
    expected = -np.mean([logp[b, t - 1, tokens[b, t]] for b, t in targets])
    # the loss's own log-softmax (11 words) and mean (6 targets), a log and an exp on the way
    np.testing.assert_allclose(loss, expected, rtol=f32_rtol(11, 6, ops=3))
    assert metrics["target_tokens"] == 6


def test_next_token_logprobs_gradient_and_accuracy_match_the_direct_formulas():
    """The compare-and-sum pick on all positions equals log_softmax + take_along_axis on
    the sliced logits, in value and gradient; accuracy equals the argmax test."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 7, 13)) * 3, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 13, size=(3, 7)))
    mask = jnp.asarray(rng.integers(0, 2, size=(3, 7)), jnp.float32)

    def direct(lg):
        logp = jax.nn.log_softmax(lg[:, :-1], axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    # each: a log-softmax over 13 words (the pick's other 12 terms are exact zeros), at the
    # scale of the log-probabilities (tests.helpers.f32_rtol)
    assert_f32_close(losses.next_token_logprobs(logits, tokens), direct(logits), [13], ops=3)
    ours = jax.grad(lambda lg: losses.sft_loss(lg, tokens, mask)[0])(logits)
    weights = mask[:, 1:] / jnp.sum(mask[:, 1:])
    expected = jax.grad(lambda lg: -jnp.sum(direct(lg) * weights))(logits)
    assert_f32_close(ours, expected, [13, 3 * 6], ops=4)  # softmax, and the weights' sum over 3 x 6
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    accuracy = losses.sft_loss(logits, tokens, mask)[1]["accuracy"]
    np.testing.assert_allclose(accuracy, jnp.sum(correct * mask[:, 1:]) / jnp.sum(mask[:, 1:]), rtol=1e-6)


def test_sft_loss_with_denominator_sums_exactly_over_microbatches():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 5, 7)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 7, size=(4, 5)))
    mask = jnp.asarray(rng.integers(0, 2, size=(4, 5)), jnp.float32)
    full, _ = losses.sft_loss(logits, tokens, mask)
    den = jnp.sum(mask[:, 1:])
    halves = sum(losses.sft_loss(logits[i:i + 2], tokens[i:i + 2], mask[i:i + 2], den)[0] for i in (0, 2))
    # the same 16 terms (log-softmax over 7 words) summed in two parts or one: the order differs
    np.testing.assert_allclose(halves, full, rtol=f32_rtol(16, 7))


# ------------------------------------------------------------------ ranking

def _brute_force_ranking_loss(rewards, ranks, mask):
    per_prompt = []
    for b in range(rewards.shape[0]):
        terms = [-math.log(1 / (1 + math.exp(-(rewards[b, w] - rewards[b, l]))))
                 for w, l in itertools.permutations(range(rewards.shape[1]), 2)
                 if mask[b, w] and mask[b, l] and ranks[b, w] < ranks[b, l]]
        if terms:
            per_prompt.append(np.mean(terms))
    return np.mean(per_prompt)


def test_ranking_loss_equals_brute_force_with_ties_masks_and_varying_k():
    rng = np.random.default_rng(2)
    B, K = 12, 9
    rewards = rng.normal(size=(B, K)) * 2
    ranks = rng.integers(0, 4, size=(B, K))  # few distinct ranks: many ties
    k_per_prompt = rng.integers(2, K + 1, size=B)
    mask = np.arange(K)[None, :] < k_per_prompt[:, None]
    ranks[0] = 0  # a prompt whose responses all tie: no pairs, excluded from the mean
    loss, metrics = losses.ranking_loss(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks), jnp.asarray(mask))
    np.testing.assert_allclose(loss, _brute_force_ranking_loss(rewards, ranks, mask), rtol=1e-5)
    assert metrics["prompts_with_pairs"] == sum(
        any(mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j] for i in range(K) for j in range(K))
        for b in range(B))


def test_ranking_loss_worked_example_and_swap():
    # one prompt, K=3, ranks (0, 1, 1): pairs (0>1), (0>2); (1,2) is a tie and is dropped.
    rewards = jnp.array([[2.0, 0.0, 1.0]])
    ranks = jnp.array([[0, 1, 1]])
    mask = jnp.ones((1, 3), bool)
    loss, metrics = losses.ranking_loss(rewards, ranks, mask)
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(-1.0)))) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)  # (0.1269 + 0.3133) / 2 = 0.2201
    assert metrics["accuracy"] == 1.0 and metrics["pairs"] == 2
    # swapping winner and loser gives -log sigmoid(r_l - r_w)
    swapped, _ = losses.ranking_loss(rewards, jnp.array([[1, 0, 0]]), mask)
    expected_swapped = (-math.log(1 / (1 + math.exp(2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    np.testing.assert_allclose(swapped, expected_swapped, rtol=1e-6)


def test_the_k2_ranking_loss_is_the_pairwise_loss():
    """Chosen/rejected data (Anthropic HH style) is the K = 2 case: -log sigmoid(r_c - r_r)."""
    chosen, rejected = jnp.array([1.0, -0.5, 0.3]), jnp.array([0.0, 0.5, 0.3])
    rewards = jnp.stack([chosen, rejected], axis=1)
    ranks = jnp.broadcast_to(jnp.array([0, 1], jnp.int32), rewards.shape)
    loss, metrics = losses.ranking_loss(rewards, ranks, jnp.ones(rewards.shape, bool))
    np.testing.assert_allclose(loss, np.mean(-jax.nn.log_sigmoid(chosen - rejected)), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], (1 + 0 + 0.5) / 3)  # reward tie counts half


# ------------------------------------------------------------------ PPO

def test_kl_estimators_vanish_for_identical_distributions_and_match_closed_forms():
    logp = jnp.log(jnp.array([[0.2, 0.5, 0.9]]))
    for kind in ("k1", "k2", "k3"):
        np.testing.assert_array_equal(losses.kl_estimate(logp, logp, kind), 0.0)
    ref = jnp.log(jnp.array([[0.4, 0.5, 0.3]]))
    r = logp - ref
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k1"), r)
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k2"), r ** 2 / 2, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k3"), jnp.exp(-r) - 1 + r, rtol=1e-5)
    assert (losses.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(logp, ref, "k4")


def test_kl_estimators_are_unbiased_where_claimed():
    # Sample from p, estimate KL(p||q) for categorical p, q: k1 and k3 unbiased.
    p = jnp.array([0.5, 0.3, 0.2])
    q = jnp.array([0.3, 0.3, 0.4])
    true_kl = float(jnp.sum(p * jnp.log(p / q)))
    samples = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
    logp, logq = jnp.log(p)[samples][None], jnp.log(q)[samples][None]
    # 3e-3 is 2.9 standard errors of a 200,000-sample mean (k1's std is 0.46 here, k3's 0.11);
    # the draw is threefry's, the same on every machine, so this is no machine's luck
    for kind in ("k1", "k3"):
        np.testing.assert_allclose(float(jnp.mean(losses.kl_estimate(logp, logq, kind))), true_kl, atol=3e-3)


def test_kl_shaped_rewards_put_the_score_on_the_last_response_token():
    logp = jnp.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -2.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, metrics = losses.kl_shaped_rewards(logp, ref, jnp.array([3.0, -1.0]), mask, beta=0.1)
    # row 0: -0.1 * (0.5, 0, 0.5) and +3 at t=2; row 1: 0 KL, -1 at t=1
    np.testing.assert_allclose(rewards, [[-0.05, 0.0, 2.95, 0.0], [0.0, -1.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(metrics["kl_to_ref"], (1.0 + 0.0) / 2)


def _gae_loop(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        last = 0.0
        n = int(mask[b].sum())
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_equals_python_loop_on_ragged_masks(gamma, lam):
    rng = np.random.default_rng(3)
    B, T = 7, 11
    lengths = rng.integers(0, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    rewards, values = rng.normal(size=(B, T)) * mask, rng.normal(size=(B, T))
    adv, ret = losses.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                          jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
    # float32 inputs and a reverse scan against a float64 loop: an advantage sums up to T
    # deltas, each |r| + |v'| + |v| at most, with 3 roundings each (tests.helpers.f32_rtol)
    scale = T * 3 * max(np.abs(rewards).max(), np.abs(values).max())
    np.testing.assert_allclose(adv, ref_adv, rtol=0, atol=f32_rtol(T, ops=3) * scale)
    np.testing.assert_allclose(ret, ref_ret, rtol=0, atol=f32_rtol(T, ops=4) * scale)


def test_whiten_gives_zero_mean_unit_variance_over_the_mask():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, -100.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    w = losses.whiten(x, mask)
    vals = w[mask > 0]
    # the mean and variance over the 5 masked values, then the test's own mean (5 more), at the
    # scale of the largest whitened value (tests.helpers.f32_rtol)
    scale = float(jnp.max(jnp.abs(vals)))
    np.testing.assert_allclose(vals.mean(), 0.0, atol=f32_rtol(5, 5, 5, ops=4) * scale)
    np.testing.assert_allclose(vals.std(), 1.0, atol=f32_rtol(5, 5, 5, ops=6) * scale ** 2)
    assert (w[mask == 0] == 0).all()


def test_policy_loss_with_ratio_one_is_minus_mean_advantage():
    rng = np.random.default_rng(4)
    logp = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, size=(3, 5)), jnp.float32)
    loss, metrics = losses.ppo_policy_loss(logp, logp, adv, mask, clip=0.2)
    # 15 terms summed in two orders; their magnitudes, not their (cancelling) sum, set the bound
    np.testing.assert_allclose(loss, -np.sum(adv * mask) / np.sum(mask), rtol=0,
                               atol=f32_rtol(15) * float(np.sum(np.abs(adv * mask)) / np.sum(mask)))
    assert metrics["clipfrac"] == 0 and metrics["approx_kl"] == 0


def test_policy_loss_clips_large_ratios():
    # ratio e^1 = 2.718 > 1.2 with A = +1: objective is capped at 1.2 and has no gradient
    old = jnp.zeros((1, 1))
    loss, metrics = losses.ppo_policy_loss(jnp.ones((1, 1)), old, jnp.ones((1, 1)), jnp.ones((1, 1)), 0.2)
    np.testing.assert_allclose(loss, -1.2, rtol=1e-6)
    assert metrics["clipfrac"] == 1.0
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, jnp.ones((1, 1)), jnp.ones((1, 1)), 0.2)[0])
    assert grad(jnp.ones((1, 1))) == 0.0


def test_value_loss_clipping():
    # old value 0, new 1, return 2: unclipped err 1, clipped (V=0.2) err 3.24 -> 0.5*3.24
    loss, metrics = losses.value_loss(jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.full((1, 1), 2.0),
                                      jnp.ones((1, 1)), clip=0.2)
    np.testing.assert_allclose(loss, 0.5 * 1.8 ** 2, rtol=1e-6)
    assert metrics["clipfrac"] == 1.0


def test_entropy_of_uniform_is_log_v():
    value, _ = losses.entropy(jnp.zeros((2, 3, 8)), jnp.ones((2, 3)))
    np.testing.assert_allclose(value, math.log(8), rtol=1e-6)


def test_ptx_coefficient_zero_gives_the_plain_ppo_gradient_exactly():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    old = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32) * 0.1
    adv = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    mask = jnp.ones((3, 6))
    pt_tokens = jnp.asarray(rng.integers(0, 6, size=(2, 5)))

    def objective(w, ptx_coef):
        logp = jax.nn.log_softmax(x @ w)
        pg, _ = losses.ppo_policy_loss(logp, old, adv, mask)
        ent, _ = losses.entropy(x @ w, jnp.ones(3))  # logits [3, 6]: 3 positions
        pt_logits = jnp.broadcast_to((x[:2] @ w)[:, None, :], (2, 5, 6))
        ptx, _ = losses.ptx_loss(pt_logits, pt_tokens, jnp.ones((2, 5)))
        return losses.ppo_objective(pg, ent, ptx, entropy_coef=0.01, ptx_coef=ptx_coef)[0]

    def plain(w):
        logp = jax.nn.log_softmax(x @ w)
        pg, _ = losses.ppo_policy_loss(logp, old, adv, mask)
        ent, _ = losses.entropy(x @ w, jnp.ones(3))
        return pg - 0.01 * ent

    np.testing.assert_array_equal(jax.grad(objective)(w, 0.0), jax.grad(plain)(w))
    assert not np.allclose(jax.grad(objective)(w, 27.8), jax.grad(plain)(w))


def test_adaptive_kl_controller_moves_beta_toward_target():
    ctl = losses.AdaptiveKLController(target=6.0, horizon=10_000)
    # KL twice the target: error clipped to +0.2, beta grows by 0.2 * 512/10000
    np.testing.assert_allclose(ctl.update(0.1, 12.0, 512), 0.1 * (1 + 0.2 * 512 / 10_000), rtol=1e-6)
    assert ctl.update(0.1, 3.0, 512) < 0.1 and ctl.update(0.1, 6.0, 512) == 0.1


def test_explained_variance():
    returns = jnp.array([[1.0, 2.0, 3.0]])
    mask = jnp.ones((1, 3))
    np.testing.assert_allclose(losses.explained_variance(returns, returns, mask), 1.0)
    np.testing.assert_allclose(losses.explained_variance(jnp.full((1, 3), 2.0), returns, mask), 0.0, atol=1e-6)


def test_best_of_n_picks_by_reward_and_judges_by_gold():
    # 3 samples x 2 prompts: the RM picks sample 2 for prompt 0 (gold 0.1) and sample 0 for
    # prompt 1 (gold 0.9); the first of tied rewards wins
    rewards = jnp.array([[0.0, 5.0], [1.0, 5.0], [2.0, -1.0]])
    gold = jnp.array([[0.8, 0.9], [0.5, 0.2], [0.1, 1.0]])
    picked, metrics = losses.best_of_n(rewards, gold)
    assert float(picked) == pytest.approx((0.1 + 0.9) / 2)
    assert float(metrics["random_gold"]) == pytest.approx(float(gold.mean()))
    assert float(metrics["oracle_gold"]) == pytest.approx((0.8 + 1.0) / 2)
    # a reward equal to the gold score picks what the oracle picks
    assert float(losses.best_of_n(gold, gold)[0]) == pytest.approx((0.8 + 1.0) / 2)


def test_win_rate_counts_ties_half():
    scores = jnp.array([1.0, 0.5, 0.2, 0.7])
    baseline = jnp.array([0.5, 0.5, 0.3, 0.7])  # win, tie, loss, tie
    assert float(losses.win_rate(scores, baseline)) == pytest.approx((1.0 + 0.5 + 0.0 + 0.5) / 4)
    assert float(losses.win_rate(baseline, baseline)) == 0.5
    # gold scores are float64 (numpy): compared as given, 1e-9 apart is a win, not the tie it
    # would be in float32 (whose spacing at 0.5 is 6e-8): the evaluation passes them unconverted
    gold = np.array([0.5 + 1e-9, 0.25]), np.array([0.5, 0.25 + 1e-9])
    assert losses.win_outcomes(*gold).tolist() == [1.0, 0.0]


def test_stderr_over_prompts_averages_each_prompts_draws_first():
    # 2 draws of 3 prompts, draw after draw: prompt means (0 + 1) / 2, (1 + 1) / 2, (0 + 0) / 2 = 0.5, 1, 0;
    # their mean 0.5, sample variance ((0)^2 + 0.5^2 + 0.5^2) / 2 = 0.25, so the error is sqrt(0.25 / 3)
    values = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert float(losses.stderr_over_prompts(values, 3)) == pytest.approx((0.25 / 3) ** 0.5, rel=1e-6)
    # counting the 6 draws as independent would give sqrt(0.3 / 6), a smaller error than the prompts allow
    assert float(losses.stderr_over_prompts(values, 6)) == pytest.approx((0.3 / 6) ** 0.5, rel=1e-6)
