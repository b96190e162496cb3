"""Stanford SHP: ``{"history", "human_ref_A", "human_ref_B", "labels"}`` per line, a Reddit
post and two of its comments; ``labels`` 1 means A is preferred, 0 means B.

The post is the prompt, as one user message (``--prompt-style text`` renders it as an HH
transcript). Dropped: an empty post or comment, A == B.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data.chat import user_message
from rlhf_jax.data.public.output import Sink
from rlhf_jax.data.public.records import BadRecord, Unusable, field


def convert_record(obj: dict[str, Any], out: Sink) -> None:
    history = field(obj, "history", str)
    a, b = field(obj, "human_ref_A", str), field(obj, "human_ref_B", str)
    label = field(obj, "labels", int)
    if label not in (0, 1):
        raise BadRecord(f'field "labels" is {label}; SHP labels are 1 (A preferred) or 0 (B preferred)')
    if not history.strip():
        raise Unusable("empty prompt")
    if not a.strip() or not b.strip():
        raise Unusable("empty answer")
    if a == b:
        raise Unusable("chosen == rejected")
    out.comparison(user_message(history), [a, b], [0, 1] if label == 1 else [1, 0])
