"""Instruction families of the embedded task: generation, parsing and gold scoring.

A prompt is ``[please] HEAD : ITEMS =>`` and the answer is a short list of words, e.g.

    copy the list : 3 a owl =>                   3 a owl
    reverse the list : cat fig 7 =>              7 fig cat
    sort from high to low : 3 12 5 =>            12 5 3
    copy the list without fig : fig cat fig owl => cat owl
    how many fig in : fig cat fig owl =>         2
    repeat 3 times : owl red =>                  owl red owl red owl red
    keep the first 2 of : a b c d =>             a b
    last 1 of : a b c d =>                       d

The prompt alone determines the answer (:func:`solve` parses it), so the gold labeler needs
no side table and works on any prompt of the task, including ones a policy never saw.
All randomness goes through a ``numpy.random.Generator``: same seed, same data.
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
# Short enough that a 2-layer, 64-wide model learns the families in minutes on a CPU.
MAX_ITEMS = {"copy": 8, "reverse": 6, "sort": 6, "omit": 8, "count": 8, "repeat": 3, "first": 6,
             "last": 6}
MAX_REPEAT_OUTPUT = 8  # repeat: items * times never exceeds this
PLEASE_PROB = 0.2  # how often a prompt starts with "please"


def _max_head_len(family: str) -> int:
    return max(len(head.split()) for head, _ in HEADS[family])


# "please" + head + ":" + items + "=>"
MAX_PROMPT_TOKENS: int = max(1 + _max_head_len(f) + 1 + MAX_ITEMS[f] + 1 for f in FAMILIES)
MAX_RESPONSE_TOKENS: int = max(MAX_REPEAT_OUTPUT, *(MAX_ITEMS[f] for f in FAMILIES))


@dataclasses.dataclass(frozen=True)
class Instance:
    """One parsed instruction: ``family``, the head's ``variant``, slot values and items."""

    family: str
    variant: str
    x: str | None  # the item-word slot, when the head has one
    n: int | None  # the number slot, when the head has one
    items: tuple[str, ...]


def solve(prompt: str) -> str:
    """The correct response to ``prompt``, as space-separated words."""
    return " ".join(_answer(parse(prompt)))


def _answer(inst: Instance) -> list[str]:
    items = list(inst.items)
    if inst.family == "copy":
        return items
    if inst.family == "reverse":
        return items[::-1]
    if inst.family == "sort":
        numeric = all(w in V.NUMBERS for w in items)
        key = (lambda w: int(w)) if numeric else (lambda w: w)
        return sorted(items, key=key, reverse=inst.variant == "desc")
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


def parse(prompt: str) -> Instance:
    """Parses a task prompt; raises ``ValueError`` naming the prompt if it is not one."""
    tokens = prompt.split()
    if len(tokens) < 3 or tokens[-1] != V.SEPARATOR or V.COLON not in tokens:
        raise ValueError(f"not a task prompt (want 'HEAD : ITEMS =>'): {prompt!r}")
    colon = tokens.index(V.COLON)
    head, items = tokens[:colon], tuple(tokens[colon + 1:-1])
    if head and head[0] == "please":
        head = head[1:]
    for family, heads in HEADS.items():
        for template, variant in heads:
            slots = _match(template.split(), head)
            if slots is not None:
                return Instance(family, variant, slots.get("x"), slots.get("n"), items)
    raise ValueError(f"no instruction family matches the head {' '.join(head)!r} of {prompt!r}")


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


def family_of(prompt: str) -> str:
    """The instruction family of ``prompt`` (for per-family evaluation)."""
    return parse(prompt).family


# ----------------------------------------------------------------------------- generation

def _pool(rng: np.random.Generator) -> tuple[str, ...]:
    # Mostly item words; letters and numbers keep the families from being word-only.
    return (V.ITEM_WORDS, V.LETTERS, V.NUMBERS)[rng.choice(3, p=[0.6, 0.2, 0.2])]


def _draw(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def _with_target(rng: np.random.Generator, n_total: int, n_target: int) -> tuple[str, list[str]]:
    """An item word ``x`` and a list of ``n_total`` item words holding ``x`` exactly
    ``n_target`` times (others drawn from a small subset so repeats are common too)."""
    x = V.ITEM_WORDS[rng.integers(len(V.ITEM_WORDS))]
    others = [w for w in V.ITEM_WORDS if w != x]
    subset = [others[i] for i in rng.choice(len(others), size=6, replace=False)]
    items = _draw(rng, subset, n_total - n_target)
    for _ in range(n_target):
        items.insert(int(rng.integers(len(items) + 1)), x)
    return x, items


def generate_instance(rng: np.random.Generator, family: str) -> Instance:
    """A random instance of ``family`` within the length bounds above."""
    variant = ""
    x = n = None
    if family in ("copy", "reverse"):
        items = _draw(rng, _pool(rng), int(rng.integers(2, MAX_ITEMS[family] + 1)))
    elif family == "sort":
        variant = ("asc", "desc")[rng.integers(2)]
        pool = (V.NUMBERS, V.LETTERS)[rng.integers(2)]
        items = _draw(rng, pool, int(rng.integers(2, MAX_ITEMS[family] + 1)))
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
        items = _draw(rng, _pool(rng), k)
    elif family in ("first", "last"):
        k = int(rng.integers(3, MAX_ITEMS[family] + 1))
        n = int(rng.integers(1, k))
        items = _draw(rng, _pool(rng), k)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return Instance(family, variant, x, n, tuple(items))


def render(inst: Instance, rng: np.random.Generator) -> str:
    """The prompt text of ``inst`` with a random phrasing of its family's head."""
    heads = [t for t, v in HEADS[inst.family] if v == inst.variant]
    head = heads[rng.integers(len(heads))]
    head = head.replace("{x}", inst.x or "").replace("{n}", str(inst.n))
    please = ["please"] if rng.random() < PLEASE_PROB else []
    return " ".join([*please, head, V.COLON, *inst.items, V.SEPARATOR])


def generate_prompt(rng: np.random.Generator, families: Sequence[str] = FAMILIES) -> str:
    """A random prompt from a family chosen uniformly among ``families``."""
    family = families[rng.integers(len(families))]
    return render(generate_instance(rng, family), rng)


# ----------------------------------------------------------------------------- gold score

def _cut_specials(tokens: list[str]) -> list[str]:
    # A response ends at its first <eos>; <pad>/<bos> are framing, not content.
    if V.EOS in tokens:
        tokens = tokens[: tokens.index(V.EOS)]
    return [t for t in tokens if t not in (V.PAD, V.BOS)]


def _sub_cost(family: str, a: str, b: str) -> float:
    if a == b:
        return 0.0
    # For a count, an off-by-one number is closer than an off-by-five one.
    if family == "count" and a in V.NUMBERS and b in V.NUMBERS:
        return 1.0 - 0.5 ** abs(int(a) - int(b))
    return 1.0


def _edit_distance(family: str, got: list[str], want: list[str]) -> float:
    """Levenshtein distance with unit insert/delete and substitution cost <= 1."""
    prev = [float(j) for j in range(len(want) + 1)]
    for i, g in enumerate(got, 1):
        cur = [float(i)] + [0.0] * len(want)
        for j, w in enumerate(want, 1):
            cur[j] = min(prev[j] + 1.0, cur[j - 1] + 1.0, prev[j - 1] + _sub_cost(family, g, w))
        prev = cur
    return prev[-1]


def gold_score(prompt: str, response: str) -> float:
    """Programmatic gold quality of ``response`` to ``prompt``, in [0, 1].

    ``1 - d / max(len(response), len(answer))`` with ``d`` the word-level edit distance to
    the correct answer (count answers: a number ``k`` off costs ``1 - 2**-k``). So a correct
    answer scores 1; every wrong word, missing word or extra word costs credit; a response of
    the right length with every word wrong, or an empty one, scores 0. Text after the first
    ``<eos>`` is ignored and ``<pad>``/``<bos>`` are dropped. Raises ``ValueError`` if
    ``prompt`` is not a task prompt.
    """
    inst = parse(prompt)
    want = _answer(inst)
    got = _cut_specials(response.split())
    denom = max(len(got), len(want))
    if denom == 0:
        return 1.0
    return max(0.0, 1.0 - _edit_distance(inst.family, got, want) / denom)


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """:func:`gold_score` of each pair: ``[N] f64``."""
    return np.array([gold_score(p, r) for p, r in zip(prompts, responses, strict=True)])


# ----------------------------------------------------------------------------- corruption

def corrupt(prompt: str, response: str, rng: np.random.Generator, n_edits: int) -> str:
    """``response`` after ``n_edits`` random edits of the kinds a small LM makes: a word
    swapped for one copied from the prompt or drawn at random, a word dropped or doubled,
    two neighbours swapped, or the tail cut off. The result is still task text."""
    tokens = response.split()
    items = list(parse(prompt).items) or list(V.CONTENT_WORDS)
    for _ in range(n_edits):
        op = rng.integers(6) if tokens else 2
        pos = int(rng.integers(len(tokens))) if tokens else 0
        word = (items[rng.integers(len(items))] if rng.random() < 0.5
                else V.CONTENT_WORDS[rng.integers(len(V.CONTENT_WORDS))])
        if op == 0:
            tokens[pos] = word
        elif op == 1:
            del tokens[pos]
        elif op == 2:
            tokens.insert(int(rng.integers(len(tokens) + 1)), word)
        elif op == 3:
            if len(tokens) > 1:
                pos = min(pos, len(tokens) - 2)
                tokens[pos], tokens[pos + 1] = tokens[pos + 1], tokens[pos]
        elif op == 4:
            tokens.insert(pos, tokens[pos])
        else:
            tokens = tokens[:pos]
    # Capped so corrupted demonstrations stay within the documented response length.
    return " ".join(tokens[:MAX_RESPONSE_TOKENS])


def sample_responses(prompt: str, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` responses of the quality a partially trained policy samples: the correct answer
    with a geometric number of edits (about a third are exact), now and then random words.
    Used to calibrate the labeler and to test rankers without a model."""
    answer = solve(prompt)
    out = []
    for _ in range(k):
        if rng.random() < 0.05:
            out.append(" ".join(_draw(rng, V.CONTENT_WORDS, int(rng.integers(1, 9)))))
        else:
            out.append(corrupt(prompt, answer, rng, min(int(rng.geometric(0.35)) - 1, 6)))
    return out
