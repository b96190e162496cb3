"""The internet's flaws: each drawn at its stated rate and seen by the gold scorer's matching
dimension, and nothing else."""

import numpy as np
import pytest

from rlhf_jax.tasks import gold as G
from rlhf_jax.tasks import internet as N
from rlhf_jax.tasks import prompts as P
from rlhf_jax.tasks import vocab as V


def _draws(rates, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [P.generate_prompt(rng) for _ in range(n)]
    return prompts, [N.flawed_response(p, rng, rates) for p in prompts]


def test_each_flaw_shows_at_its_stated_rate():
    prompts, responses = _draws(N.INTERNET)
    rates = G.flaw_rates(prompts, responses)
    tolerance = 3 * np.sqrt(0.25 / 4000)  # three standard errors of a rate, at most
    requests = [P.parse(p) for p in prompts]
    toxic, chatty = np.mean([r.toxic for r in requests]), np.mean([r.chatty for r in requests])
    assert rates["offensive"] == pytest.approx(
        toxic * N.INTERNET.offensive_toxic + (1 - toxic) * N.INTERNET.offensive, abs=tolerance)
    assert rates["offensive_toxic"] == pytest.approx(N.INTERNET.offensive_toxic, abs=2 * tolerance)
    assert rates["rambling_chatty"] == pytest.approx(N.INTERNET.rambling_chatty, abs=2 * tolerance)
    rambling = chatty * N.INTERNET.rambling_chatty + (1 - chatty) * N.INTERNET.rambling
    assert rates["rambling"] == pytest.approx(rambling, abs=tolerance)
    assert rates["hallucination"] == pytest.approx(N.INTERNET.hallucination, abs=tolerance)
    # ignored, or met and then rambled past: 1 - (1 - ignores) * (1 - rambling)
    expected = 1 - (1 - N.INTERNET.ignores_constraint) * (1 - rambling)
    assert rates["constraint_violation"] == pytest.approx(expected, abs=2 * tolerance)
    for p, r in zip(prompts, responses):
        assert len(r.split()) <= N.MAX_FLAWED_RESPONSE_TOKENS
        assert set(r.split()) <= set(V.VOCAB) - set(V.SPECIAL_TOKENS)


def test_no_flaws_means_the_correct_response():
    prompts, responses = _draws(N.FlawRates(), n=300)
    assert responses == [P.solve(p) for p in prompts]


@pytest.mark.parametrize("flaws, dimension", [(("content",), "correct"), (("wrong_instruction",), "correct"),
                                              (("hallucination",), "grounded"),
                                              (("offensive", "offensive_toxic"), "respectful"),
                                              (("rambling", "rambling_chatty"), "concise"),
                                              (("ignores_constraint",), "constraint")])
def test_a_flaw_costs_only_its_own_dimension(flaws, dimension):
    prompts, responses = _draws(N.FlawRates(**{f: 1.0 for f in flaws}), n=500)
    # hallucinated items are wrong items too; rambling past the end breaks a constraint
    also = {"hallucination": "correct", "rambling": "constraint"}.get(flaws[0])
    hit = applies = 0
    for p, r in zip(prompts, responses):
        scores = G.assess(p, r).scores
        others = {k: v for k, v in scores.items() if k not in (dimension, also)}
        assert all(v == 1.0 for v in others.values()), (p, r, scores)
        applies += dimension in scores  # 40% of prompts have a constraint
        hit += scores.get(dimension, 1.0) < 1.0
    assert hit > 0.8 * applies  # content edits can cancel out (two swaps, say)


def test_content_edits_never_hallucinate():
    rng = np.random.default_rng(3)
    for _ in range(500):
        prompt = P.generate_prompt(rng)
        request = P.parse(prompt)
        words = N.corrupt_words(_answer(request), request, rng, 3)
        assert not G.assess(prompt, " ".join(words)).hallucinated, (prompt, words)
        assert N.corrupt_words(_answer(request), request, rng, 0) == _answer(request)


def _answer(request):
    from rlhf_jax.tasks.instructions import answer_words

    return answer_words(request.problem)


def test_sample_responses_have_a_spread_of_qualities():
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(300):
        prompt = P.generate_prompt(rng)
        scores += [G.gold_score(prompt, r) for r in N.sample_responses(prompt, 4, rng)]
    scores = np.array(scores)
    # Like a partially trained policy: some perfect, most partial.
    assert 0.2 < np.mean(scores == 1.0) < 0.5
    assert 0.6 < scores.mean() < 0.9


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="offensive"):
        N.FlawRates(offensive=1.5)
