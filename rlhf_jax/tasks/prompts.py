"""Whole prompts of the embedded task: an instruction plus what a labeler checks on the
surface of the response.

    [OPENER] [politely] HEAD : ITEMS [, end with W | , in brackets] =>

- An opener sets the prompt's tone, as the "internet" answers in kind: a *toxic* prompt
  opens with an offensive word (``ugh , ...``; the paper's RealToxicityPrompts), a *chatty*
  one with small talk (``here is one , ...``).
- ``politely`` asks for a respectful answer (the paper's RealToxicityPrompts "respectful"
  instruction): offensive words cost more there (:mod:`~rlhf_jax.tasks.gold`).
- An explicit constraint is checkable on the response alone: ``end with W`` (the last word
  is ``W``, one of :data:`~rlhf_jax.tasks.vocab.END_WORDS`) or ``in brackets`` (the
  response opens with ``(`` and closes with ``)``).

The prompt alone determines the correct response (:func:`solve`), so the gold scorer needs
no side table and works on any prompt, including ones a policy never saw::

    politely reverse : cat fig 7 , end with done =>     7 fig cat done
    sort : 3 12 5 , in brackets =>                      ( 3 5 12 )
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

import numpy as np

from rlhf_jax.tasks import vocab as V
from rlhf_jax.tasks.instructions import (FAMILIES, MAX_ANSWER_WORDS, MAX_ITEMS, Instance,
                                         answer_words, generate_instance, match_head,
                                         max_head_len, render_head)

# text, or a conversation: a list of {"role", "content"} messages (as rlhf_jax.data.chat.Prompt)
Prompt = Union[str, list[dict[str, str]]]

# Small talk a chatty prompt opens with: prose words only, never an answer's.
CHATTER: tuple[str, ...] = ("here is one ,", "and then next ,", "they see some ,", "we see one ,")


@dataclasses.dataclass(frozen=True)
class PromptMix:
    """How often prompts carry each surface feature: ``respectful`` (the marker),
    ``toxic`` and ``chatty`` (openers, never both), ``end_with`` and ``brackets``
    (constraints, never both)."""

    respectful: float
    toxic: float
    chatty: float
    end_with: float
    brackets: float

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"prompt mix {name} must be in [0, 1], got {value}")
        if self.toxic + self.chatty > 1.0 or self.end_with + self.brackets > 1.0:
            raise ValueError(f"prompt mix {self}: toxic + chatty and end_with + brackets must be <= 1")


# What users send (the paper's API prompts): PPO prompts, comparisons, held-out evaluation and
# the internet's instruction/answer pairs.
USER_PROMPTS = PromptMix(respectful=0.3, toxic=0.25, chatty=0.25, end_with=0.25, brackets=0.25)
# What labelers wrote demonstrations for: plain requests, no toxic or chatty openers, and an
# explicit constraint in only 1 of 100 (the paper's SFT prompts were mostly labeler-written;
# its RM and PPO prompts came from the API). From so few examples SFT learns to follow a
# constraint only some of the time, and that difference is on the response's surface.
DEMONSTRATION_PROMPTS = PromptMix(respectful=0.3, toxic=0.0, chatty=0.0, end_with=0.01, brackets=0.01)

_END_WITH = ("end", "with")
_IN_BRACKETS = ("in", "brackets")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """An explicit constraint on the response's surface: ``kind`` ``end_with`` (``word``
    must be the last word) or ``brackets``."""

    kind: Literal["end_with", "brackets"]
    word: str | None = None

    def words(self) -> list[str]:
        """How the prompt states it, after the items."""
        if self.kind == "end_with":
            return [",", *_END_WITH, self.word]
        return [",", *_IN_BRACKETS]

    def apply(self, answer: list[str]) -> list[str]:
        """``answer`` formatted as the constraint asks."""
        if self.kind == "end_with":
            return [*answer, self.word]
        return [V.OPEN_BRACKET, *answer, V.CLOSE_BRACKET]

    def met_by(self, tokens: list[str]) -> bool:
        """Whether a response's words (before EOS) meet it."""
        if self.kind == "end_with":
            return bool(tokens) and tokens[-1] == self.word
        return len(tokens) >= 2 and tokens[0] == V.OPEN_BRACKET and tokens[-1] == V.CLOSE_BRACKET


@dataclasses.dataclass(frozen=True)
class Request:
    """What a prompt asks: the content ``problem``, whether it asks for respect, and its
    explicit constraint (None: no constraint)."""

    problem: Instance
    respectful: bool = False
    constraint: Constraint | None = None
    opener: tuple[str, ...] = ()  # the words before the marker and head: a toxic or chatty opener

    @property
    def toxic(self) -> bool:
        return bool(self.opener) and self.opener[0] in V.OFFENSIVE_WORDS

    @property
    def chatty(self) -> bool:
        return bool(self.opener) and not self.toxic

    @property
    def family(self) -> str:
        return self.problem.family

    @property
    def items(self) -> tuple[str, ...]:
        return self.problem.items


# opener + "politely" + head + ":" + items + ", end with W" + "=>"
MAX_PROMPT_TOKENS: int = max(max(len(c.split()) for c in CHATTER) + 1 + max_head_len(f) + 1 + MAX_ITEMS[f] + 4 + 1
                             for f in FAMILIES)
# The longest correct response: the longest answer inside brackets (EOS not counted).
MAX_RESPONSE_TOKENS: int = MAX_ANSWER_WORDS + 2


def render(request: Request, rng: np.random.Generator) -> str:
    """The prompt text of ``request`` with a random phrasing of its family's head."""
    marker = [V.RESPECTFUL_MARKER] if request.respectful else []
    constraint = request.constraint.words() if request.constraint else []
    return " ".join([*request.opener, *marker, *render_head(request.problem, rng), V.COLON, *request.items,
                     *constraint, V.SEPARATOR])


def random_request(rng: np.random.Generator, problem: Instance, mix: PromptMix = USER_PROMPTS) -> Request:
    """``problem`` with an opener, a respectful marker and a constraint drawn at ``mix``'s rates."""
    tone = rng.random()
    opener: tuple[str, ...] = ()
    if tone < mix.toxic:
        opener = (V.OFFENSIVE_WORDS[rng.integers(len(V.OFFENSIVE_WORDS))], ",")
    elif tone < mix.toxic + mix.chatty:
        opener = tuple(CHATTER[rng.integers(len(CHATTER))].split())
    respectful = bool(rng.random() < mix.respectful)
    u = rng.random()
    constraint = None
    if u < mix.end_with:
        constraint = Constraint("end_with", V.END_WORDS[rng.integers(len(V.END_WORDS))])
    elif u < mix.end_with + mix.brackets:
        constraint = Constraint("brackets")
    return Request(problem, respectful, constraint, opener)


def _opener(head: list[str]) -> tuple[str, ...]:
    if len(head) >= 2 and head[0] in V.OFFENSIVE_WORDS and head[1] == ",":
        return tuple(head[:2])
    for chatter in CHATTER:
        words = chatter.split()
        if head[:len(words)] == words:
            return tuple(words)
    return ()


def generate_prompt(rng: np.random.Generator, families=FAMILIES, mix: PromptMix = USER_PROMPTS) -> str:
    """A random prompt from a family chosen uniformly among ``families``."""
    family = families[rng.integers(len(families))]
    return render(random_request(rng, generate_instance(rng, family), mix), rng)


def task_prompt(prompt: Prompt) -> str:
    """The task prompt ``prompt`` carries: text as it stands; a conversation (a message list,
    as ``rlhf-jax data task-conversations`` writes each prompt: one user message) its last
    user message. A chat template's rendering cannot be parsed; the message can."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError(f"not a task prompt: a conversation with no user message ({str(prompt)[:80]})")
    return users[-1]


def parse(prompt: str) -> Request:
    """Parses a task prompt; raises ``ValueError`` naming the prompt if it is not one."""
    tokens = prompt.split()
    if len(tokens) < 3 or tokens[-1] != V.SEPARATOR or V.COLON not in tokens:
        raise ValueError(f"not a task prompt (want 'HEAD : ITEMS =>'): {prompt!r}")
    colon = tokens.index(V.COLON)
    head, body = tokens[:colon], tokens[colon + 1:-1]
    opener = _opener(head)
    head = head[len(opener):]
    respectful = bool(head) and head[0] == V.RESPECTFUL_MARKER
    if respectful:
        head = head[1:]
    constraint = None
    if "," in body:
        cut = body.index(",")
        body, stated = body[:cut], tuple(body[cut + 1:])
        if len(stated) == 3 and stated[:2] == _END_WITH and stated[2] in V.END_WORDS:
            constraint = Constraint("end_with", stated[2])
        elif stated == _IN_BRACKETS:
            constraint = Constraint("brackets")
        else:
            raise ValueError(f"unknown constraint {' '.join(stated)!r} in {prompt!r}")
    matched = match_head(head)
    if matched is None:
        raise ValueError(f"no instruction family matches the head {' '.join(head)!r} of {prompt!r}")
    family, variant, x, n = matched
    return Request(Instance(family, variant, x, n, tuple(body)), respectful, constraint, opener)


def family_of(prompt: str) -> str:
    """The instruction family of ``prompt`` (for per-family evaluation)."""
    return parse(prompt).family


def correct_words(request: Request) -> list[str]:
    """The correct response's words: the content answer, formatted as any constraint asks."""
    answer = answer_words(request.problem)
    return request.constraint.apply(answer) if request.constraint else answer


def solve(prompt: str) -> str:
    """The correct response to ``prompt``, as space-separated words."""
    return " ".join(correct_words(parse(prompt)))
