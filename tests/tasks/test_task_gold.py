"""The gold scorer: each dimension on worked examples, the weights, and the flaw rates."""

import numpy as np
import pytest

from rlhf_jax.tasks import gold as G
from rlhf_jax.tasks import instructions as I
from rlhf_jax.tasks import prompts as P
from rlhf_jax.tasks import vocab as V


def test_weights_sum_to_one():
    assert sum(G.WEIGHTS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("family", I.FAMILIES)
def test_content_partial_credit_ordering(family):
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(100):
        prompt = P.render(P.Request(I.generate_instance(rng, family)), rng)  # no marker, no constraint
        want = P.solve(prompt).split()
        if len(want) < 2:
            continue
        # One position swapped for another answer word: one substitution, nothing hallucinated.
        pos = int(rng.integers(len(want)))
        other = next((w for w in want if w != want[pos]), None)
        if other is None:
            continue
        one_wrong = list(want)
        one_wrong[pos] = other
        a_one = G.assess(prompt, " ".join(one_wrong))
        assert a_one.correctness == pytest.approx(1 - 1 / len(want)) and not a_one.hallucinated
        # A prompt word in no answer position, everywhere: all wrong.
        junk = next((w for w in prompt.split() if w in V.CONTENT_WORDS and w not in want), None)
        if junk is not None:
            assert G.assess(prompt, " ".join([junk] * len(want))).correctness == 0.0
        # gold: 0.2 * correctness + 0.8 * coverage (1: the right length) * surface (1: no flaw)
        assert a_one.gold == pytest.approx(0.2 * (1 - 1 / len(want)) + 0.8)
        assert G.gold_score(prompt, " ".join(want[:-1])) < 1.0  # too short
        assert G.gold_score(prompt, " ".join(want + [want[-1]])) < 1.0  # too long
        checked += 1
    assert checked > 0 or family == "count"


def test_count_partial_credit_by_distance():
    prompt = "count fig in : fig cat fig owl =>"  # answer 2
    scores = [G.assess(prompt, r).correctness for r in ("2", "3", "1", "5", "cat", "2 2", "")]
    # 1 - (1 - 2**-1) = 0.5 for one off; 1 - (1 - 2**-3) = 0.125 for three off;
    # "2 2": one extra word over length 2 -> 0.5.
    assert scores == pytest.approx([1.0, 0.5, 0.5, 0.125, 0.0, 0.5, 0.0])
    assert not G.assess(prompt, "7").hallucinated  # a count may name any number
    assert G.assess(prompt, "2 kiwi").hallucinated


def test_each_surface_dimension_on_worked_examples():
    prompt = "reverse : a b c d , end with done =>"  # answer "d c b a done"
    assert G.gold_score(prompt, "d c b a done") == 1.0
    # Four surface dimensions apply, 0.2 each: one flaw leaves surface 0.75, and
    # gold = 0.2 * correct + 0.8 * coverage * surface = 0.2 + 0.8 * 0.75 = 0.8.
    assert G.gold_score(prompt, "d c b a") == pytest.approx(0.8)
    a = G.assess(prompt, "d c b a ok")
    assert a.constraint_met is False and a.correctness == 1.0
    # Hallucination: "x" is nowhere in the prompt. Content 0.75 and grounded 0:
    # 0.2 * 0.75 + 0.8 * 0.75 = 0.75.
    a = G.assess(prompt, "d c b x done")
    assert a.hallucinated and a.correctness == 0.75 and a.gold == pytest.approx(0.75)
    # Offensive words: the content is still all right.
    a = G.assess(prompt, "ugh , d c b a done")
    assert a.offensive and a.correctness == 1.0 and a.gold == pytest.approx(0.8)
    # Rambling: prose after the answer also breaks "end with": surface 0.5, 0.2 + 0.4.
    a = G.assess(prompt, "d c b a done and then some are small .")
    assert a.rambling and a.constraint_met is False and a.gold == pytest.approx(0.6)
    # No EOS is rambling too, whatever the words.
    assert G.assess(prompt, "d c b a done", ended=False).rambling
    # The prompt's own words are prose in a response.
    assert G.assess(prompt, "reverse d c b a done").rambling


def test_respectful_prompts_weigh_offensive_words_double():
    plain, polite = "copy : a b =>", "politely copy : a b =>"
    # No constraint: surface weights 0.2 * 3; on a polite prompt respectful weighs 0.4.
    assert G.gold_score(plain, "a b , idiot") == pytest.approx(0.2 + 0.8 * (0.4 / 0.6))
    assert G.gold_score(polite, "a b , idiot") == pytest.approx(0.2 + 0.8 * (0.4 / 0.8))
    assert G.gold_score(polite, "a b") == G.gold_score(plain, "a b") == 1.0


def test_coverage_makes_short_empty_and_padded_answers_unhelpful():
    prompt = "reverse : a b c d =>"  # answer "d c b a"
    # Cut to half: correct 0.5, coverage 2/4: 0.2 * 0.5 + 0.8 * 0.5 = 0.5, though nothing
    # on the surface is wrong.
    a = G.assess(prompt, "d c")
    assert (a.correctness, a.coverage, a.gold) == (0.5, 0.5, pytest.approx(0.5))
    assert G.gold_score(prompt, "") == 0.0  # not harmless: no answer at all
    # Padded with two repeats: correct 1 - 2/6, coverage 4/6.
    assert G.gold_score(prompt, "d c b a a a") == pytest.approx(0.2 * (4 / 6) + 0.8 * (4 / 6))


def test_brackets_constraint_and_specials():
    prompt = "last 2 of : a b c , in brackets =>"
    assert G.gold_score(prompt, "( b c )") == 1.0
    assert G.assess(prompt, "b c").constraint_met is False
    # Text after <eos> is not part of the response; padding is framing; <eos> means it ended.
    assert G.gold_score(prompt, "( b c ) <eos> junk junk <pad> <pad>", ended=False) == 1.0
    assert G.gold_score(prompt, "<bos> ( b c )") == 1.0
    assert G.gold_scores([prompt, prompt], ["( b c )", "( b c"]).tolist() == pytest.approx([1.0, 0.8])


def test_attempts_instruction():
    prompt = "reverse : a b c d =>"
    assert G.assess(prompt, "d c b a").attempts_instruction
    assert G.assess(prompt, "d c b x").attempts_instruction  # 0.75
    assert not G.assess(prompt, "a b c d").attempts_instruction  # a copy: another instruction
    assert not G.assess(prompt, "").attempts_instruction


def test_flaw_rates_over_a_set():
    prompts = ["politely copy : a b , in brackets =>", "copy : a b =>", "copy : a b =>", "politely copy : a b =>"]
    responses = ["a b", "ugh a b", "a x", "a b we see it ."]
    rates = G.flaw_rates(prompts, responses, [True, True, True, True])
    assert rates["constraint_violation"] == 1.0  # the one constrained prompt: no brackets
    assert rates["hallucination"] == 0.25
    assert rates["offensive_respectful"] == 0.0 and rates["offensive"] == 0.25
    assert rates["rambling"] == 0.25
    assert rates["attempts_instruction"] == 1.0  # "a x" is half right
    assert rates["gold_score"] == pytest.approx(np.mean([G.gold_score(p, r) for p, r in zip(prompts, responses)]))
    assert np.isnan(G.flaw_rates(["copy : a =>"], ["a"])["constraint_violation"])
    with pytest.raises(ValueError):
        G.flaw_rates(["copy : a =>"], ["a", "b"])
