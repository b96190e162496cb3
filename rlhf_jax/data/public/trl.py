"""TRL's dataset layouts, and UltraFeedback binarized (which is TRL's implicit layout).

Each record's layout is read from its fields, text or conversational (message lists):

- preference, explicit prompt ``{prompt, chosen, rejected}``: a comparison, chosen first;
  conversational replies are one assistant message each;
- preference, implicit prompt ``{chosen, rejected}``: conversations share every message but
  the last (the prompt) and end with the replies; text transcripts are cut as HH's, after
  the last ``\\n\\nAssistant:`` (a shared prefix of two texts is not a prompt: answers often
  start alike);
- prompt-completion ``{prompt, completion}`` and conversational language modelling
  ``{messages}`` (the last message is the reply): demonstrations;
- prompt-only ``{prompt}``: a prompt; language modelling ``{text}``: pretraining text;
- unpaired preference (``label``) and stepwise supervision (``completions``) hold no
  ranking and are dropped.

``score_chosen``/``score_rejected``, when both are numbers, rank the pair (equal scores
are a tie, ranks ``[0, 0]``). UltraFeedback binarized (``ultrafeedback-binarized``): the
implicit conversational layout, always with scores; its text ``prompt`` column repeats
the user message and is not read.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data.chat import Message, split_transcript
from rlhf_jax.data.public.output import Sink
from rlhf_jax.data.public.records import BadRecord, Unusable, conversation, field, number


def _reply(value: Any, name: str) -> str:
    """A conversational reply: one assistant message's content."""
    if not isinstance(value, list):
        raise BadRecord(f'field "{name}" must be a message list like the prompt, got {type(value).__name__}')
    if len(value) != 1:
        raise Unusable("reply of more than one message")
    message = value[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise Unusable("reply that is not an assistant message")
    if not isinstance(message.get("content"), str):
        raise Unusable("message content that is not text")
    return message["content"]


def _split_conversation(messages: Any, name: str) -> tuple[list[Message], str]:
    """A whole conversation as (prompt, last reply)."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise Unusable("conversation without a prompt and a reply")
    return conversation(messages[:-1]), _reply(messages[-1:], name)


def _ranks(obj: dict[str, Any], require_scores: bool) -> list[int]:
    scores = [number(obj.get("score_chosen")), number(obj.get("score_rejected"))]
    if None in scores:
        if require_scores:
            raise BadRecord('"score_chosen" and "score_rejected" must be numbers')
        return [0, 1]
    chosen, rejected = scores
    return [0, 0] if chosen == rejected else [0, 1] if chosen > rejected else [1, 0]


def _compare(obj: dict[str, Any], out: Sink, prompt: Any, replies: list[str], require_scores: bool) -> None:
    if not all(r.strip() for r in replies):
        raise Unusable("empty final reply")
    if replies[0] == replies[1]:
        raise Unusable("chosen == rejected")
    out.comparison(prompt, replies, _ranks(obj, require_scores))


def _implicit(obj: dict[str, Any], out: Sink, require_scores: bool) -> None:
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise BadRecord('"chosen" and "rejected" must both be text or both message lists')
    if isinstance(chosen, str):
        cuts = split_transcript(chosen), split_transcript(rejected)
        if None in cuts:
            raise Unusable("text pair without a prompt (no \\n\\nAssistant: turn to cut after)")
        (prompt, best), (other, worse) = cuts
    else:
        prompt, best = _split_conversation(chosen, "chosen")
        other, worse = _split_conversation(rejected, "rejected")
    if prompt != other:
        raise Unusable("prompts differ between chosen and rejected")
    _compare(obj, out, prompt, [best, worse], require_scores)


def convert_record(obj: dict[str, Any], out: Sink) -> None:
    """One record of any TRL layout (see the module docstring)."""
    if "chosen" in obj or "rejected" in obj:
        field(obj, "chosen", (str, list))
        field(obj, "rejected", (str, list))
        if "prompt" not in obj:
            return _implicit(obj, out, require_scores=False)
        prompt = field(obj, "prompt", (str, list))
        if isinstance(prompt, str):
            best, worse = field(obj, "chosen", str), field(obj, "rejected", str)
            return _compare(obj, out, prompt, [best, worse], require_scores=False)
        return _compare(obj, out, conversation(prompt), [_reply(obj["chosen"], "chosen"),
                                                         _reply(obj["rejected"], "rejected")], False)
    if "label" in obj:
        raise Unusable("unpaired preference (label): no ranking")
    if "completions" in obj:
        raise Unusable("stepwise supervision: no ranking")
    if "completion" in obj:
        prompt = field(obj, "prompt", (str, list))
        if isinstance(prompt, str):
            response = field(obj, "completion", str)
        else:
            prompt, response = conversation(prompt), _reply(obj["completion"], "completion")
        if not response.strip():
            raise Unusable("empty completion")
        return out.demonstration(prompt, response)
    if "messages" in obj:
        prompt, response = _split_conversation(field(obj, "messages", list), "messages")
        if not response.strip():
            raise Unusable("empty completion")
        return out.demonstration(prompt, response)
    if "prompt" in obj:
        prompt = field(obj, "prompt", (str, list))
        return out.prompt(prompt if isinstance(prompt, str) else conversation(prompt))
    if "text" in obj:
        text = field(obj, "text", str)
        if not text.strip():
            raise Unusable("empty text")
        return out.text(text)
    raise BadRecord("none of the TRL layouts' fields (prompt, chosen/rejected, completion, messages, text)")


def convert_ultrafeedback_binarized(obj: dict[str, Any], out: Sink) -> None:
    """A row of ``HuggingFaceH4/ultrafeedback_binarized``: ``chosen``/``rejected`` whole
    conversations, ``score_chosen``/``score_rejected``."""
    field(obj, "chosen", list)
    field(obj, "rejected", list)
    _implicit(obj, out, require_scores=True)
