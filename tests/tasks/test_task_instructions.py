"""Instruction families: generation, parsing, gold scoring, corruption."""

import numpy as np
import pytest

from rlhf_jax.tasks import instructions as I
from rlhf_jax.tasks import vocab as V


def _instances(family, n=200, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        inst = I.generate_instance(rng, family)
        yield inst, I.render(inst, rng)


@pytest.mark.parametrize("family", I.FAMILIES)
def test_demonstration_scores_one_and_parses_back(family):
    for inst, prompt in _instances(family):
        assert I.parse(prompt) == inst
        assert I.family_of(prompt) == family
        answer = I.solve(prompt)
        assert I.gold_score(prompt, answer) == 1.0
        assert prompt.endswith(" " + V.SEPARATOR)
        assert len(prompt.split()) <= I.MAX_PROMPT_TOKENS
        assert 1 <= len(answer.split()) <= I.MAX_RESPONSE_TOKENS
        assert set(prompt.split()) | set(answer.split()) <= set(V.VOCAB) - set(V.SPECIAL_TOKENS)


def test_length_bounds_are_reached():
    # The documented maxima are tight, so a model config sized from them wastes nothing.
    rng = np.random.default_rng(1)
    prompts = [I.generate_prompt(rng) for _ in range(20000)]
    assert max(len(p.split()) for p in prompts) == I.MAX_PROMPT_TOKENS == 16
    assert max(len(I.solve(p).split()) for p in prompts) == I.MAX_RESPONSE_TOKENS == 8


@pytest.mark.parametrize("prompt, answer", [
    ("reverse the list : cat fig 7 =>", "7 fig cat"),
    ("sort from high to low : 3 12 5 =>", "12 5 3"),
    ("sort : c a b a =>", "a a b c"),
    ("sort in increasing order : 10 9 2 =>", "2 9 10"),  # numeric, not string, order
    ("copy the list without fig : fig cat fig owl =>", "cat owl"),
    ("please how many fig in : fig cat fig owl =>", "2"),
    ("count owl in : fig cat =>", "0"),
    ("repeat 3 times : owl red =>", "owl red owl red owl red"),
    ("keep the first 2 of : a b c d =>", "a b"),
    ("last 1 of : a b c d =>", "d"),
])
def test_solve_worked_examples(prompt, answer):
    assert I.solve(prompt) == answer


@pytest.mark.parametrize("family", I.FAMILIES)
def test_partial_credit_ordering(family):
    rng = np.random.default_rng(2)
    checked = 0
    for _, prompt in _instances(family, n=100):
        want = I.solve(prompt).split()
        if len(want) < 2:
            continue
        # A word that is in no answer position: every position substituted is all wrong.
        junk = next(w for w in V.ITEM_WORDS if w not in want)
        one_wrong = list(want)
        one_wrong[int(rng.integers(len(want)))] = junk
        all_wrong = [junk] * len(want)
        s_one = I.gold_score(prompt, " ".join(one_wrong))
        s_all = I.gold_score(prompt, " ".join(all_wrong))
        assert s_one == pytest.approx(1 - 1 / len(want))
        assert s_all == 0.0
        assert 1.0 > s_one > s_all
        assert I.gold_score(prompt, " ".join(want[:-1])) < 1.0  # too short
        assert I.gold_score(prompt, " ".join(want + [want[-1]])) < 1.0  # too long
        assert I.gold_score(prompt, "") == 0.0
        checked += 1
    assert checked > 0 or family == "count"


def test_count_partial_credit_by_distance():
    prompt = "count fig in : fig cat fig owl =>"  # answer 2
    scores = [I.gold_score(prompt, r) for r in ("2", "3", "1", "5", "cat", "2 2", "")]
    # 1 - (1 - 2**-1) = 0.5 for one off; 1 - (1 - 2**-3) = 0.125 for three off;
    # "2 2": one extra word over length 2 -> 0.5.
    assert scores == pytest.approx([1.0, 0.5, 0.5, 0.125, 0.0, 0.5, 0.0])


def test_gold_score_worked_example_and_specials():
    prompt = "reverse : a b c d =>"
    # One substitution in four words: 1 - 1/4.
    assert I.gold_score(prompt, "d c b x") == pytest.approx(0.75)
    # A deleted word: distance 1 over max length 4.
    assert I.gold_score(prompt, "d c b") == pytest.approx(0.75)
    # Text after <eos> is not part of the response; padding is framing.
    assert I.gold_score(prompt, "d c b a <eos> junk junk <pad> <pad>") == 1.0
    assert I.gold_score(prompt, "<bos> d c b a") == 1.0
    assert I.gold_score(prompt, "d  c\tb a") == 1.0  # whitespace-insensitive, as tokenized
    # "a": three deletions against the four-word answer -> 1 - 3/4.
    assert I.gold_scores([prompt, prompt], ["d c b a", "a"]).tolist() == pytest.approx([1.0, 0.25])


@pytest.mark.parametrize("bad", ["reverse a b c", "reverse : a b", "jump : a b =>",
                                 "count 3 in : a b =>", ""])
def test_parse_rejects_non_task_prompts(bad):
    with pytest.raises(ValueError):
        I.parse(bad)


def test_corrupt_and_sample_responses_stay_in_task_text():
    rng = np.random.default_rng(3)
    content = set(V.VOCAB) - set(V.SPECIAL_TOKENS)
    scores = []
    for _ in range(300):
        prompt = I.generate_prompt(rng)
        for r in I.sample_responses(prompt, 4, rng):
            assert set(r.split()) <= content
            assert len(r.split()) <= I.MAX_RESPONSE_TOKENS
            scores.append(I.gold_score(prompt, r))
        assert I.corrupt(prompt, I.solve(prompt), rng, 0) == I.solve(prompt)
    scores = np.array(scores)
    # A spread of qualities, like a partially trained policy: some exact, most partial.
    assert 0.2 < np.mean(scores == 1.0) < 0.5
    assert 0.5 < scores.mean() < 0.85


def test_generation_is_deterministic():
    a = [I.generate_prompt(np.random.default_rng(7)) for _ in range(3)]
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [I.generate_prompt(rng1) for _ in range(50)] == [I.generate_prompt(rng2) for _ in range(50)]
    assert len(set(a)) == 1
