"""UltraFeedback, the raw set (``openbmb/UltraFeedback``): per ``instruction``, 4
``completions`` from different models, each with GPT-4 ``annotations`` of four aspects
(``instruction_following``, ``honesty``, ``truthfulness``, ``helpfulness``, each a
``Rating`` string "1".."5" or "N/A") and an ``overall_score`` (1-10, from the critique).

One K-wise comparison per instruction, exactly what the paper's reward-model loss takes:
responses ranked by score, higher first, equal scores tied. ``--score aspects`` (default)
is the mean of the aspects' ratings, "N/A" left out (Argilla's binarization chose it after
finding ``overall_score`` of 10 on responses its own critique pans); ``--score overall``
uses ``overall_score``. A response is dropped when empty, unrated (every aspect "N/A", or no
``overall_score``) or a repeat of an earlier one's text; an instruction with fewer than two
responses left is dropped. The instruction is the prompt, as one user message.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data.chat import user_message
from rlhf_jax.data.public.output import Sink
from rlhf_jax.data.public.records import BadRecord, Unusable, dense_ranks, field, number

ASPECTS: tuple[str, ...] = ("instruction_following", "honesty", "truthfulness", "helpfulness")


def _rating(annotation: Any, what: str) -> float | None:
    """One aspect's ``Rating``: 1..5, or None for "N/A"."""
    if isinstance(annotation, list) and len(annotation) == 1:  # some exports wrap each aspect in a list
        annotation = annotation[0]
    rating = field(annotation if isinstance(annotation, dict) else {}, "Rating", str, f'field "{what}.Rating"')
    if rating.strip().upper() == "N/A":
        return None
    if rating.strip() not in ("1", "2", "3", "4", "5"):
        raise BadRecord(f'field "{what}.Rating" is {rating!r}; expected "1".."5" or "N/A"')
    return float(rating)


def score(completion: dict[str, Any], which: str, what: str) -> float | None:
    """A completion's ranking score, None when it has none."""
    if which == "overall":
        return number(completion.get("overall_score"))
    annotations = field(completion, "annotations", dict, f'field "{what}.annotations"')
    ratings = [_rating(annotations[a], f"{what}.annotations.{a}") for a in ASPECTS if a in annotations]
    ratings = [r for r in ratings if r is not None]
    return sum(ratings) / len(ratings) if ratings else None


def convert_record(obj: dict[str, Any], out: Sink) -> None:
    instruction = field(obj, "instruction", str)
    completions = field(obj, "completions", list)
    responses, scores = [], []
    for i, completion in enumerate(completions):
        what = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise BadRecord(f'field "{what}" must be an object, got {type(completion).__name__}')
        response = field(completion, "response", str, f'field "{what}.response"')
        value = score(completion, out.options.score, what)
        if not response.strip():
            out.drop("response: empty")
        elif value is None:
            out.drop("response: unrated")
        elif response in responses:
            out.drop("response: repeats another")
        else:
            responses.append(response)
            scores.append(value)
    if not instruction.strip():
        raise Unusable("empty prompt")
    if len(responses) < 2:
        raise Unusable("fewer than 2 rated responses")
    out.comparison(user_message(instruction), responses, dense_ranks(scores))
