"""Instruction families of the embedded task: the *content* of a request.

A family's head and items determine the answer's words, e.g.

    copy the list : 3 a owl                   3 a owl
    reverse the list : cat fig 7              7 fig cat
    sort from high to low : 3 12 5            12 5 3
    copy the list without fig : fig cat fig owl   cat owl
    how many fig in : fig cat fig owl         2
    repeat 3 times : owl red                  owl red owl red owl red
    keep the first 2 of : a b c d             a b
    last 1 of : a b c d                       d

What a whole prompt adds around this (a respectful marker, an explicit constraint) and how
a response is judged live in :mod:`~rlhf_jax.tasks.prompts` and
:mod:`~rlhf_jax.tasks.gold`. All randomness goes through a ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.tasks import vocab as V

# Each family has several phrasings ("heads"); ``{x}`` is an item-word slot and ``{n}`` a
# number slot. Paraphrases make the SFT model generalise over wording rather than memorise
# one template. The second field of each head is the variant it selects (sort direction).
HEADS: dict[str, tuple[tuple[str, str], ...]] = {
    "copy": (("copy", ""), ("copy the list", ""), ("write the list", ""), ("say", "")),
    "reverse": (("reverse the list", ""), ("reverse", ""), ("write backwards", ""),
                ("reverse the order of", "")),
    "sort": (("sort", "asc"), ("sort ascending", "asc"), ("sort in increasing order", "asc"),
             ("sort from low to high", "asc"), ("sort descending", "desc"),
             ("sort in decreasing order", "desc"), ("sort from high to low", "desc")),
    "omit": (("copy without {x}", ""), ("copy the list without {x}", ""),
             ("remove {x} from", ""), ("omit {x}", ""), ("drop every {x} from", "")),
    "count": (("count {x} in", ""), ("how many {x} in", ""), ("count the {x} in", "")),
    "repeat": (("repeat {n} times", ""), ("say {n} times", ""), ("write {n} times", "")),
    "first": (("first {n} of", ""), ("keep the first {n} of", ""),
              ("keep only the first {n} of", "")),
    "last": (("last {n} of", ""), ("keep the last {n} of", ""),
             ("keep only the last {n} of", "")),
}
FAMILIES: tuple[str, ...] = tuple(HEADS)

# Longest item list per family; with the longest head these bound the prompt length.
# Short enough that a 2-layer, 128-wide model samples mostly right answers after minutes of
# training on a CPU.
MAX_ITEMS = {"copy": 6, "reverse": 5, "sort": 5, "omit": 6, "count": 6, "repeat": 3, "first": 5,
             "last": 5}
MAX_REPEAT_OUTPUT = 6  # repeat: items * times never exceeds this
# Longest content answer in words (before any constraint's formatting).
MAX_ANSWER_WORDS: int = max(MAX_REPEAT_OUTPUT, *(MAX_ITEMS[f] for f in FAMILIES))


def max_head_len(family: str) -> int:
    return max(len(head.split()) for head, _ in HEADS[family])


@dataclasses.dataclass(frozen=True)
class Instance:
    """One problem: ``family``, the head's ``variant``, slot values and items. Two prompts
    with the same instance ask the same question, whatever their phrasing or constraint."""

    family: str
    variant: str
    x: str | None  # the item-word slot, when the head has one
    n: int | None  # the number slot, when the head has one
    items: tuple[str, ...]


def answer_words(inst: Instance) -> list[str]:
    """The content of the correct answer to ``inst``, as words."""
    items = list(inst.items)
    if inst.family == "copy":
        return items
    if inst.family == "reverse":
        return items[::-1]
    if inst.family == "sort":
        return sort_items(items, descending=inst.variant == "desc")
    if inst.family == "omit":
        return [w for w in items if w != inst.x]
    if inst.family == "count":
        return [str(items.count(inst.x))]
    if inst.family == "repeat":
        return items * inst.n
    if inst.family == "first":
        return items[: inst.n]
    if inst.family == "last":
        return items[len(items) - inst.n:]
    raise ValueError(f"unknown family {inst.family!r}")


def sort_items(items: Sequence[str], descending: bool) -> list[str]:
    """Numbers in numeric order, anything else in string order."""
    numeric = all(w in V.NUMBERS for w in items)
    return sorted(items, key=(lambda w: int(w)) if numeric else (lambda w: w), reverse=descending)


def wrong_instruction_answers(inst: Instance) -> list[list[str]]:
    """Answers to *other* instructions on the same items (a copy, a reversal, a sort in
    either direction), the ones differing from the correct answer: what a model gives that
    attempts the wrong instruction."""
    items = list(inst.items)
    want = answer_words(inst)
    candidates = [items, items[::-1], sort_items(items, False), sort_items(items, True)]
    out: list[list[str]] = []
    for c in candidates:
        if c != want and c not in out:
            out.append(c)
    return out


def match_head(head: Sequence[str]) -> tuple[str, str, str | None, int | None] | None:
    """``(family, variant, x, n)`` for a head's words, or None if no family's phrasing fits."""
    for family, heads in HEADS.items():
        for template, variant in heads:
            slots = _match(template.split(), list(head))
            if slots is not None:
                return family, variant, slots.get("x"), slots.get("n")
    return None


def _match(template: list[str], head: list[str]) -> dict | None:
    if len(template) != len(head):
        return None
    slots: dict = {}
    for t, w in zip(template, head):
        if t == "{x}" and w in V.ITEM_WORDS:
            slots["x"] = w
        elif t == "{n}" and w in V.NUMBERS:
            slots["n"] = int(w)
        elif t != w:
            return None
    return slots


def render_head(inst: Instance, rng: np.random.Generator) -> list[str]:
    """The words of a random phrasing of ``inst``'s head, slots filled."""
    heads = [t for t, v in HEADS[inst.family] if v == inst.variant]
    head = heads[rng.integers(len(heads))]
    return head.replace("{x}", inst.x or "").replace("{n}", str(inst.n)).split()


# ----------------------------------------------------------------------------- generation

def _pool(rng: np.random.Generator) -> tuple[str, ...]:
    # Mostly item words; letters and numbers keep the families from being word-only.
    return (V.ITEM_WORDS, V.LETTERS, V.NUMBERS)[rng.choice(3, p=[0.6, 0.2, 0.2])]


def draw_words(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def _with_target(rng: np.random.Generator, n_total: int, n_target: int) -> tuple[str, list[str]]:
    """An item word ``x`` and a list of ``n_total`` item words holding ``x`` exactly
    ``n_target`` times (others drawn from a small subset so repeats are common too)."""
    x = V.ITEM_WORDS[rng.integers(len(V.ITEM_WORDS))]
    others = [w for w in V.ITEM_WORDS if w != x]
    subset = [others[i] for i in rng.choice(len(others), size=6, replace=False)]
    items = draw_words(rng, subset, n_total - n_target)
    for _ in range(n_target):
        items.insert(int(rng.integers(len(items) + 1)), x)
    return x, items


def generate_instance(rng: np.random.Generator, family: str) -> Instance:
    """A random instance of ``family`` within the length bounds above."""
    variant = ""
    x = n = None
    if family in ("copy", "reverse"):
        items = draw_words(rng, _pool(rng), int(rng.integers(2, MAX_ITEMS[family] + 1)))
    elif family == "sort":
        variant = ("asc", "desc")[rng.integers(2)]
        pool = (V.NUMBERS, V.LETTERS)[rng.integers(2)]
        items = draw_words(rng, pool, int(rng.integers(2, MAX_ITEMS[family] + 1)))
    elif family == "omit":
        total = int(rng.integers(3, MAX_ITEMS[family] + 1))
        x, items = _with_target(rng, total, int(rng.integers(1, min(3, total - 1) + 1)))
    elif family == "count":
        total = int(rng.integers(2, MAX_ITEMS[family] + 1))
        # A count of 0 happens (the item is absent) so "0" is a learnable answer.
        x, items = _with_target(rng, total, int(rng.integers(0, min(4, total) + 1)))
    elif family == "repeat":
        k = int(rng.integers(1, MAX_ITEMS[family] + 1))
        n = int(rng.integers(2, MAX_REPEAT_OUTPUT // k + 1))
        items = draw_words(rng, _pool(rng), k)
    elif family in ("first", "last"):
        k = int(rng.integers(3, MAX_ITEMS[family] + 1))
        n = int(rng.integers(1, k))
        items = draw_words(rng, _pool(rng), k)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return Instance(family, variant, x, n, tuple(items))
