"""The task's data sets: demonstrations, prompts and pretraining text, as lists of records.

Splits are carved so that evaluation is honest: held-out prompts and validation
demonstrations are *problems* (family, slots and items, whatever the phrasing) that appear
nowhere in training data, pretraining text included; training demonstrations and PPO
prompts are disjoint from each other too, as in the paper (SFT and PPO prompt sets differ).
The held-out families (:data:`HELD_OUT_FAMILIES`) appear only in pretraining text: no
demonstration, comparison or PPO prompt asks them, and ``prompts_heldout`` evaluates them
apart (the paper's InstructGPT followed instructions it was hardly trained on).

Pretraining text is the "internet" of this world: instruction/answer pairs whose answers
carry every flaw the gold scorer knows at the rates of :data:`~rlhf_jax.tasks.internet.INTERNET`
(so a base LM is a flawed instruction follower and SFT has something to fix), plus repeated
lists, number and letter runs and short sentences that teach the vocabulary, copying,
order and counting without the instruction format.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rlhf_jax.tasks import vocab as V
from rlhf_jax.tasks.instructions import FAMILIES, Instance, answer_words, generate_instance
from rlhf_jax.tasks.internet import INTERNET, MAX_FLAWED_RESPONSE_TOKENS, FlawRates, corrupt_words, flawed_response
from rlhf_jax.tasks.prompts import (DEMONSTRATION_PROMPTS, MAX_PROMPT_TOKENS, USER_PROMPTS, PromptMix, parse,
                                    random_request, render)

# Longest pretraining text in tokens: a prompt followed by a (possibly flawed) answer.
MAX_TEXT_TOKENS: int = MAX_PROMPT_TOKENS + MAX_FLAWED_RESPONSE_TOKENS
# Families only the pretraining text asks (evaluated apart, on prompts_heldout).
HELD_OUT_FAMILIES: tuple[str, ...] = ("last",)
# Consecutive duplicate draws after which a split gives up: the families cannot supply
# that many distinct problems.
_MAX_REJECTS = 10_000


class ProblemSampler:
    """Draws prompts of new problems: never one in ``exclude`` nor one it drew before."""

    def __init__(self, rng: np.random.Generator, families: Sequence[str], exclude: set,
                 mix: PromptMix = USER_PROMPTS):
        self.rng, self.families, self.used, self.mix = rng, tuple(families), exclude, mix

    def draw(self, claim: bool = True) -> tuple[Instance, str]:
        """A fresh ``(instance, prompt)``; ``claim=False`` allows repeats of its own draws
        (pretraining text) while still avoiding the excluded problems."""
        for _ in range(_MAX_REJECTS):
            family = self.families[self.rng.integers(len(self.families))]
            inst = generate_instance(self.rng, family)
            if inst not in self.used:
                if claim:
                    self.used.add(inst)
                return inst, render(random_request(self.rng, inst, self.mix), self.rng)
        raise ValueError(f"ran out of distinct problems in families {self.families} after "
                         f"{len(self.used)}; ask for fewer examples")


def demonstrations(sampler: ProblemSampler, n: int, noise: float) -> list[dict]:
    """``n`` ``{"prompt", "response"}`` records: correct, constraint met, respectful and
    concise; a fraction ``noise`` carry one content edit, like a careless human
    demonstrator."""
    out = []
    for _ in range(n):
        _, prompt = sampler.draw()
        request = parse(prompt)
        words = answer_words(request.problem)
        if sampler.rng.random() < noise:
            # A demonstrator's slip never leaves the answer empty: an empty response is
            # invalid demonstration data (the SFT loader rejects it, naming the line).
            words = corrupt_words(words, request, sampler.rng, 1) or words
        response = " ".join(request.constraint.apply(words) if request.constraint else words)
        out.append({"prompt": prompt, "response": response})
    return out


def prompts(sampler: ProblemSampler, n: int) -> list[dict]:
    """``n`` ``{"prompt"}`` records of distinct, unclaimed problems."""
    return [{"prompt": sampler.draw()[1]} for _ in range(n)]


# ----------------------------------------------------------------------------- pretraining

def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[rng.integers(len(words))]


def _list_text(rng: np.random.Generator) -> str:
    # A list said twice: copying earlier context is the skill every family builds on, and
    # a tiny model learns it far sooner from text where the copy is predictable.
    pool = (V.ITEM_WORDS, V.LETTERS, V.NUMBERS)[rng.integers(3)]
    items = " ".join(_pick(rng, pool) for _ in range(int(rng.integers(2, 9))))
    return f"{items} , {items} ."


def _run_text(rng: np.random.Generator) -> str:
    # Counting and alphabet runs, both directions: the order sorting needs.
    seq = (V.NUMBERS, V.LETTERS)[rng.integers(2)]
    length = int(rng.integers(3, 11))
    start = int(rng.integers(len(seq) - length + 1))
    run = list(seq[start:start + length])
    return " ".join(run[::-1] if rng.random() < 0.5 else run)


def _sentence_text(rng: np.random.Generator) -> str:
    kind = int(rng.integers(6))
    if kind == 0:
        return f"the {_pick(rng, V.ANIMALS)} is {_pick(rng, V.COLORS)} ."
    if kind == 1:
        return f"{_pick(rng, V.FRUITS)} and {_pick(rng, V.FRUITS)} are {_pick(rng, V.COLORS)} ."
    if kind == 2:
        seq = (V.NUMBERS, V.LETTERS)[rng.integers(2)]
        i = int(rng.integers(len(seq) - 1))
        return f"after {seq[i]} comes {seq[i + 1]} ."
    if kind == 3:
        # Counting: the number matches the copies that follow.
        k, item = int(rng.integers(1, 6)), _pick(rng, V.ITEM_WORDS)
        return " ".join(["here", "are", str(k), item, V.COLON, *[item] * k, "."])
    if kind == 4:
        return f"we like {_pick(rng, V.ITEM_WORDS)} , they like {_pick(rng, V.ITEM_WORDS)} ."
    item, color = _pick(rng, V.ITEM_WORDS), _pick(rng, V.COLORS)
    return f"is {item} {color} ? {_pick(rng, ('yes', 'no'))} !"


def pretraining_texts(sampler: ProblemSampler, n: int, pair_fraction: float,
                      internet: FlawRates) -> list[dict]:
    """``n`` ``{"text"}`` records: a ``pair_fraction`` of them ``prompt answer`` pairs whose
    answer carries each flaw at the rates ``internet``; the rest repeated lists, runs and
    sentences in equal shares."""
    rng = sampler.rng
    others: tuple[Callable[[np.random.Generator], str], ...] = (
        _list_text, _run_text, _sentence_text)
    out = []
    for _ in range(n):
        if rng.random() < pair_fraction:
            _, prompt = sampler.draw(claim=False)
            text = f"{prompt} {flawed_response(prompt, rng, internet)}".strip()
        else:
            text = others[rng.integers(len(others))](rng)
        out.append({"text": text})
    return out


def make_splits(seed: int = 0, n_demonstrations: int = 2000, n_demonstrations_val: int = 200,
                n_prompts: int = 4000, n_prompts_val: int = 200, n_prompts_heldout: int = 200,
                n_pretrain: int = 20000, n_pretrain_val: int = 1000, demo_noise: float = 0.1,
                pretrain_pair_fraction: float = 0.5, internet: FlawRates = INTERNET,
                demonstration_prompts: PromptMix = DEMONSTRATION_PROMPTS, families: Sequence[str] = FAMILIES,
                held_out_families: Sequence[str] = HELD_OUT_FAMILIES) -> dict[str, list[dict]]:
    """Every split of the task as lists of records, deterministic in all arguments.

    ``families`` are the families in the world (all in pretraining text);
    ``held_out_families`` (a subset, possibly empty) are only in pretraining text and
    ``prompts_heldout`` (empty if none). Each split draws from its own generator
    (``default_rng([seed, i])``), and the held-out splits are drawn first, so e.g.
    changing ``n_pretrain`` leaves the prompts unchanged.
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ValueError(f"unknown or no families {unknown or families}; known: {FAMILIES}")
    trained = tuple(f for f in families if f not in held_out_families)
    if set(held_out_families) - set(families) or not trained:
        raise ValueError(f"held_out_families {tuple(held_out_families)} must be some, not all, of the "
                         f"families {tuple(families)}")
    for name, value in (("demo_noise", demo_noise), ("pretrain_pair_fraction", pretrain_pair_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    used: set = set()  # problems claimed so far, shared by every split in this order

    def sampler(i: int, pool: Sequence[str] = trained, mix: PromptMix = USER_PROMPTS) -> ProblemSampler:
        return ProblemSampler(np.random.default_rng([seed, i]), pool, used, mix)

    out = {
        "prompts_val": prompts(sampler(0), n_prompts_val),
        "demonstrations_val": demonstrations(sampler(1, mix=demonstration_prompts), n_demonstrations_val,
                                             demo_noise),
        "prompts_heldout": (prompts(sampler(6, tuple(held_out_families)), n_prompts_heldout)
                            if held_out_families else []),
    }
    held_out = set(used)
    out["demonstrations"] = demonstrations(sampler(2, mix=demonstration_prompts), n_demonstrations, demo_noise)
    out["prompts"] = prompts(sampler(3), n_prompts)
    # Pretraining may repeat training problems but never a held-out one.
    for i, (name, n) in enumerate((("pretrain", n_pretrain), ("pretrain_val", n_pretrain_val))):
        pre = ProblemSampler(np.random.default_rng([seed, 4 + i]), families, held_out)
        out[name] = pretraining_texts(pre, n, pretrain_pair_fraction, internet)
    return out
