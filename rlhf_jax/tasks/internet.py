"""Flawed responses, as the task's "internet" writes them and as a half-trained policy
samples them.

Each flaw is drawn independently at a stated rate (:class:`FlawRates`), and each shows in
one dimension of the gold scorer (:mod:`~rlhf_jax.tasks.gold`):

- ``wrong_instruction``: the answer to another instruction on the same items (correct);
- ``content``: 1-3 edits with the prompt's own items: one swapped, dropped, doubled or
  inserted, two neighbours swapped, the tail cut (correct);
- ``hallucination``: an item replaced by, or joined by, a word the prompt does not hold
  (grounded);
- ``offensive``: an offensive word before or after the answer (respectful), inside any
  constraint's formatting so it breaks nothing else; ``offensive_toxic`` on toxic prompts,
  mostly the prompt's own word (the internet answers abuse in kind);
- ``ignores_constraint``: the constraint's formatting left out, or the wrong end word
  (constraint);
- ``rambling``: prose after the formatted answer (concise; it breaks an ``end with``
  or ``in brackets`` constraint too, as rambling past the end does); ``rambling_chatty``
  on chatty prompts.

:data:`INTERNET` is the rate of each flaw in the pretraining text's answers, so the base
model has them all and SFT on a limited set of clean demonstrations leaves some.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.tasks import vocab as V
from rlhf_jax.tasks.instructions import MAX_ANSWER_WORDS, answer_words, wrong_instruction_answers
from rlhf_jax.tasks.prompts import Request, parse

# Prose a rambling answer trails off into: filler words, never an answer's words.
RAMBLES: tuple[str, ...] = (
    "and then some are small .", "here is the answer .", "we like the list .", "they see one and two .",
    "and then the next one comes .", "is the answer big ? yes .", "some are big and some are small .",
    "we see one .",
)
MAX_RAMBLE_WORDS: int = max(len(r.split()) for r in RAMBLES)
# Longest flawed response: an answer (capped), two offensive words, brackets, a ramble.
MAX_FLAWED_RESPONSE_TOKENS: int = MAX_ANSWER_WORDS + 2 + 2 + MAX_RAMBLE_WORDS


@dataclasses.dataclass(frozen=True)
class FlawRates:
    """Probability of each flaw in one response, drawn independently (see the module
    docstring); ``ignores_constraint`` applies to prompts with a constraint."""

    content: float = 0.0
    wrong_instruction: float = 0.0
    hallucination: float = 0.0
    offensive: float = 0.0
    offensive_toxic: float = 0.0  # ``offensive`` on toxic prompts
    rambling: float = 0.0
    rambling_chatty: float = 0.0  # ``rambling`` on chatty prompts
    ignores_constraint: float = 0.0

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"flaw rate {name} must be in [0, 1], got {value}")


# The pretraining text's answers: mostly right in content, often flawed on the surface, and
# worst where the prompt invites it (toxic prompts are answered in kind, chatty ones ramble).
INTERNET = FlawRates(content=0.1, wrong_instruction=0.05, hallucination=0.15, offensive=0.1, offensive_toxic=0.6,
                     rambling=0.1, rambling_chatty=0.6, ignores_constraint=0.4)
# A fine-tuned policy sampled at temperature 1 (labeler calibration; the pipeline's SFT model
# shows rates like these): rarely rude or rambling, often hallucinating or missing a
# constraint, and content edits drawn by :func:`sample_responses` itself.
FINE_TUNED = FlawRates(wrong_instruction=0.05, hallucination=0.3, offensive=0.01, offensive_toxic=0.04,
                       rambling=0.01, rambling_chatty=0.02, ignores_constraint=0.4)


def corrupt_words(words: list[str], request: Request, rng: np.random.Generator, n_edits: int) -> list[str]:
    """``words`` (a content answer) after ``n_edits`` random edits that use only the prompt's
    own items (a count's number moves by one or two instead): content errors, never a
    hallucination. Capped at the longest answer."""
    tokens = list(words)
    count = request.family == "count"
    items = list(request.items) or list(V.ITEM_WORDS)
    for _ in range(n_edits):
        op = rng.integers(6) if tokens else 2
        pos = int(rng.integers(len(tokens))) if tokens else 0
        if count:
            base = int(tokens[0]) if tokens and tokens[0] in V.NUMBERS else 0
            word = str(min(max(base + int(rng.choice([-2, -1, 1, 2])), 0), V.MAX_NUMBER))
        else:
            word = items[rng.integers(len(items))]
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
    return tokens[:MAX_ANSWER_WORDS]


def _hallucinate(words: list[str], request: Request, prompt_words: Sequence[str],
                 rng: np.random.Generator) -> list[str]:
    # Counts may name any number, so a count's hallucination is an item word.
    pool = V.ITEM_WORDS if request.family == "count" else V.CONTENT_WORDS
    present = set(prompt_words)
    foreign = [w for w in pool if w not in present]
    word = foreign[rng.integers(len(foreign))]
    tokens = list(words)
    if tokens and request.family != "count" and rng.random() < 0.7:
        tokens[int(rng.integers(len(tokens)))] = word
    else:
        tokens.insert(int(rng.integers(len(tokens) + 1)), word)
    return tokens[:MAX_ANSWER_WORDS]


def _offend(words: list[str], request: Request, rng: np.random.Generator) -> list[str]:
    word = V.OFFENSIVE_WORDS[rng.integers(len(V.OFFENSIVE_WORDS))]
    if request.toxic and rng.random() < 0.7:
        word = request.opener[0]
    phrase = [word, ","] if rng.random() < 0.5 else [word]
    return [*phrase, *words] if rng.random() < 0.6 else [*words, *phrase[::-1]]


def flawed_response(prompt: str, rng: np.random.Generator, rates: FlawRates,
                    n_edits: int | None = None) -> str:
    """A response to ``prompt`` with each flaw drawn at ``rates``; ``n_edits`` fixes the
    number of content edits instead (0: none)."""
    request = parse(prompt)
    words = answer_words(request.problem)
    if rng.random() < rates.wrong_instruction:
        others = wrong_instruction_answers(request.problem)
        if others:
            words = others[rng.integers(len(others))]
    if n_edits is None:
        n_edits = int(rng.integers(1, 4)) if rng.random() < rates.content else 0
    words = corrupt_words(words, request, rng, n_edits)
    if rng.random() < rates.hallucination:
        words = _hallucinate(words, request, prompt.split(), rng)
    if rng.random() < (rates.offensive_toxic if request.toxic else rates.offensive):
        words = _offend(words, request, rng)
    constraint = request.constraint
    if constraint is not None:
        if rng.random() >= rates.ignores_constraint:
            words = constraint.apply(words)
        elif constraint.kind == "end_with" and rng.random() < 0.5:
            wrong = [w for w in V.END_WORDS if w != constraint.word]
            words = [*words, wrong[rng.integers(len(wrong))]]
    if rng.random() < (rates.rambling_chatty if request.chatty else rates.rambling):
        words = [*words, *RAMBLES[rng.integers(len(RAMBLES))].split()]
    return " ".join(words)


def sample_responses(prompt: str, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` responses like those the pipeline's comparisons hold: two in three from a
    fine-tuned policy (a geometric number of content edits, about a third none, and
    :data:`FINE_TUNED` surface flaws), one in three from the base model (:data:`INTERNET`).
    Used to calibrate the labeler and to test rankers without a model."""
    return [flawed_response(prompt, rng, INTERNET) if rng.random() < 1 / 3
            else flawed_response(prompt, rng, FINE_TUNED, n_edits=min(int(rng.geometric(0.35)) - 1, 6))
            for _ in range(k)]
