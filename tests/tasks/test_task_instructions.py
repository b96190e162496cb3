"""Instruction families and whole prompts: generation, parsing, solving, length bounds."""

import numpy as np
import pytest

from rlhf_jax.tasks import instructions as I
from rlhf_jax.tasks import prompts as P
from rlhf_jax.tasks import vocab as V


def _requests(family, n=200, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        request = P.random_request(rng, I.generate_instance(rng, family))
        yield request, P.render(request, rng)


@pytest.mark.parametrize("family", I.FAMILIES)
def test_prompts_parse_back_and_their_answers_score_one(family):
    from rlhf_jax.tasks.gold import gold_score

    for request, prompt in _requests(family):
        assert P.parse(prompt) == request
        assert P.family_of(prompt) == family
        answer = P.solve(prompt)
        assert gold_score(prompt, answer) == 1.0
        assert prompt.endswith(" " + V.SEPARATOR)
        assert len(prompt.split()) <= P.MAX_PROMPT_TOKENS
        assert 1 <= len(answer.split()) <= P.MAX_RESPONSE_TOKENS
        assert set(prompt.split()) | set(answer.split()) <= set(V.VOCAB) - set(V.SPECIAL_TOKENS)


def test_length_bounds_are_reached_and_markers_at_their_rates():
    # The documented maxima are tight, so a model config sized from them wastes nothing.
    rng = np.random.default_rng(1)
    prompts = [P.generate_prompt(rng) for _ in range(20000)]
    assert max(len(p.split()) for p in prompts) == P.MAX_PROMPT_TOKENS == 22
    assert max(len(P.solve(p).split()) for p in prompts) == P.MAX_RESPONSE_TOKENS == 8
    requests = [P.parse(p) for p in prompts]
    # 20000 draws: three standard errors of a rate near 0.2-0.3 are under 0.01
    mix = P.USER_PROMPTS
    assert abs(np.mean([r.respectful for r in requests]) - mix.respectful) < 0.01
    assert abs(np.mean([r.toxic for r in requests]) - mix.toxic) < 0.01
    assert abs(np.mean([r.chatty for r in requests]) - mix.chatty) < 0.01
    assert not any(r.toxic and r.chatty for r in requests)
    kinds = [r.constraint.kind if r.constraint else None for r in requests]
    assert abs(kinds.count("end_with") / len(kinds) - mix.end_with) < 0.01
    assert abs(kinds.count("brackets") / len(kinds) - mix.brackets) < 0.01
    # demonstrations' prompts: no openers, no constraints when the mix says so
    plain = P.PromptMix(respectful=0.5, toxic=0.0, chatty=0.0, end_with=0.0, brackets=0.0)
    drawn = [P.parse(P.generate_prompt(rng, mix=plain)) for _ in range(500)]
    assert not any(r.opener or r.constraint for r in drawn) and any(r.respectful for r in drawn)
    with pytest.raises(ValueError, match="toxic"):
        P.PromptMix(respectful=0.1, toxic=0.8, chatty=0.5, end_with=0.0, brackets=0.0)


@pytest.mark.parametrize("prompt, answer", [
    ("reverse the list : cat fig 7 =>", "7 fig cat"),
    ("sort from high to low : 3 12 5 =>", "12 5 3"),
    ("sort : c a b a =>", "a a b c"),
    ("sort in increasing order : 10 9 2 =>", "2 9 10"),  # numeric, not string, order
    ("copy the list without fig : fig cat fig owl =>", "cat owl"),
    ("politely how many fig in : fig cat fig owl =>", "2"),
    ("count owl in : fig cat =>", "0"),
    ("repeat 3 times : owl red =>", "owl red owl red owl red"),
    ("keep the first 2 of : a b c d , end with done =>", "a b done"),
    ("last 1 of : a b c d , in brackets =>", "( d )"),
    ("politely sort : 3 12 5 , end with ! =>", "3 5 12 !"),
    ("ugh , politely copy : fig =>", "fig"),
    ("here is one , reverse : a b , in brackets =>", "( b a )"),
])
def test_solve_worked_examples(prompt, answer):
    assert P.solve(prompt) == answer


def test_parse_reads_the_respectful_marker_and_constraints():
    request = P.parse("politely reverse : a b , end with ok =>")
    assert request.respectful and request.constraint == P.Constraint("end_with", "ok")
    assert request.items == ("a", "b") and request.family == "reverse"
    assert P.parse("reverse : a b , in brackets =>").constraint == P.Constraint("brackets")
    assert P.parse("reverse : a b =>").constraint is None
    toxic = P.parse("idiot , politely reverse : a b =>")
    assert toxic.toxic and not toxic.chatty and toxic.opener == ("idiot", ",") and toxic.respectful
    chatty = P.parse("they see some , reverse : a b =>")
    assert chatty.chatty and not chatty.toxic and chatty.family == "reverse"
    assert not P.parse("reverse : a b =>").toxic


@pytest.mark.parametrize("bad", ["reverse a b c", "reverse : a b", "jump : a b =>", "count 3 in : a b =>", "",
                                 "reverse : a b , end with fig =>", "reverse : a b , in red =>"])
def test_parse_rejects_non_task_prompts(bad):
    with pytest.raises(ValueError):
        P.parse(bad)


def test_constraint_checks_on_the_surface():
    end = P.Constraint("end_with", "done")
    assert end.met_by(["a", "b", "done"]) and not end.met_by(["a", "b"]) and not end.met_by([])
    assert not end.met_by(["a", "done", "b"])
    brackets = P.Constraint("brackets")
    assert brackets.met_by(["(", "a", ")"]) and brackets.met_by(["(", ")"])
    assert not brackets.met_by(["(", "a"]) and not brackets.met_by(["a", ")"]) and not brackets.met_by(["("])
    assert brackets.apply(["a"]) == ["(", "a", ")"] and end.apply(["a"]) == ["a", "done"]


def test_wrong_instruction_answers_differ_from_the_answer():
    rng = np.random.default_rng(4)
    for family in I.FAMILIES:
        for _ in range(50):
            inst = I.generate_instance(rng, family)
            others = I.wrong_instruction_answers(inst)
            assert I.answer_words(inst) not in others
            assert len(others) == len({tuple(o) for o in others})
    inst = I.Instance("reverse", "", None, None, ("a", "b", "c"))
    assert I.wrong_instruction_answers(inst) == [["a", "b", "c"]]  # copy = sort asc; reverse = sort desc


def test_generation_is_deterministic():
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [P.generate_prompt(rng1) for _ in range(50)] == [P.generate_prompt(rng2) for _ in range(50)]
