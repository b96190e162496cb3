"""Conversational prompts: a message list ``[{"role", "content"}, ...]`` in place of a string.

A record's prompt is either plain text, tokenised as it stands, or a conversation that the
tokenizer renders with its chat template (:class:`~rlhf_jax.data.tokenizer.HFTokenizer`).
A conversation holds ``system``, ``user`` and ``assistant`` messages and ends with a
``user`` message: the response is the assistant's next turn.

Anthropic's plain-text dialogue layout (``\\n\\nHuman: ...\\n\\nAssistant: ...``) converts
both ways: :func:`parse_transcript` and :func:`render_transcript`.
"""

from __future__ import annotations

import re
from typing import Any, Union

Message = dict[str, str]
Prompt = Union[str, list[Message]]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


class MessageError(ValueError):
    """A message list that is not a usable conversation; the reader adds file and line.
    ``reason`` says what, in a few words a converter can count by."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_messages(value: Any, name: str = "prompt") -> list[Message]:
    """``value`` as a conversation prompt (a copy holding only role and content).

    Raises :class:`MessageError` naming the field: ``field "prompt"[2] has role "tool"``.
    """
    if not isinstance(value, list) or not value:
        raise MessageError(f'field "{name}" must be a string or a non-empty list of messages',
                           "not a message list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise MessageError(f'field "{name}"[{i}] must be an object {{"role", "content"}}, '
                               f"got {type(message).__name__}", "a message is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise MessageError(f'field "{name}"[{i}] has role {role!r}; expected one of {ROLES}',
                               "a role other than system/user/assistant")
        if not isinstance(content, str):
            raise MessageError(f'field "{name}"[{i}] "content" must be a string, got {type(content).__name__}',
                               "message content that is not text")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise MessageError(f'field "{name}" ends with a {messages[-1]["role"]!r} message; a prompt ends with '
                           'the "user" turn the response answers', "prompt not ending with a user turn")
    return messages


def is_conversation(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


def user_message(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def split_transcript(text: str) -> tuple[str, str] | None:
    """An HH transcript cut after its *last* ``\\n\\nAssistant:``: ``(prompt, reply)``.

    The prompt keeps the marker and the reply keeps its leading space, so ``prompt + reply
    == text``. None when there is no marker. Cutting at the first turn, or where two
    transcripts start to differ, would put earlier turns or shared opening words on the
    wrong side.
    """
    at = text.rfind(ASSISTANT)
    if at < 0:
        return None
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:]


def parse_transcript(prompt: str) -> list[Message] | None:
    """An HH prompt (``... \\n\\nHuman: q\\n\\nAssistant:``) as messages, or None when the text
    is not in that layout. Text before the first turn becomes a system message."""
    if not prompt.endswith(ASSISTANT):
        return None
    preamble, *turns = _TURN.split(prompt[: -len(ASSISTANT)])
    if not turns or turns[-2] != "Human":
        return None
    messages = [{"role": "system", "content": preamble.strip()}] if preamble.strip() else []
    for speaker, text in zip(turns[::2], turns[1::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
    return messages


def render_transcript(messages: list[Message]) -> str:
    """Messages as an HH prompt: ``\\n\\nHuman: ...`` / ``\\n\\nAssistant: ...`` turns, then
    ``\\n\\nAssistant:`` for the reply (a system message goes first, as plain text)."""
    parts = []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"])
        else:
            parts.append(f"{HUMAN if message['role'] == 'user' else ASSISTANT} {message['content']}")
    return "".join(parts) + ASSISTANT


def prompt_text(prompt: Prompt) -> str:
    """A prompt for display: text as it is; a conversation as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
