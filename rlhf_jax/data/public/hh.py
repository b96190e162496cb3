"""Anthropic HH-RLHF: ``{"chosen", "rejected"}``, two transcripts of ``\\n\\nHuman: ...`` /
``\\n\\nAssistant: ...`` turns that differ in the last reply.

The prompt is each transcript up to and including its *last* ``\\n\\nAssistant:``; the
replies keep their leading space (the prompt ends at the colon). Both replies often open
with the same words, so the cut is never where the two transcripts start to differ.
Dropped: a transcript without an ``\\n\\nAssistant:`` turn, prompts that differ between
chosen and rejected, an empty final reply, chosen == rejected.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data.chat import split_transcript
from rlhf_jax.data.public.output import Sink
from rlhf_jax.data.public.records import Unusable, field


def convert_record(obj: dict[str, Any], out: Sink) -> None:
    chosen, rejected = field(obj, "chosen", str), field(obj, "rejected", str)
    cut_chosen, cut_rejected = split_transcript(chosen), split_transcript(rejected)
    if cut_chosen is None or cut_rejected is None:
        raise Unusable("no \\n\\nAssistant: turn")
    (prompt, best), (other_prompt, worse) = cut_chosen, cut_rejected
    if prompt != other_prompt:
        raise Unusable("prompts differ between chosen and rejected")
    if not best.strip() or not worse.strip():
        raise Unusable("empty final reply")
    if best == worse:
        raise Unusable("chosen == rejected")
    out.comparison(prompt, [best, worse], [0, 1])
