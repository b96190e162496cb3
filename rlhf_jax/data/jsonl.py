"""Validating readers for the JSONL interchange files.

One record per line; empty lines are skipped. Schemas (``kind``):

- ``demonstrations``: ``{"prompt": str, "response": str}``
- ``text``: ``{"text": str}`` (pretraining text)
- ``prompts``: ``{"prompt": str}``
- ``responses``: ``{"prompt": str, "responses": [str, ...]}`` with 2 <= K <= 9: responses to
  be ranked (the labeling page's input)
- ``comparisons``: ``{"prompt": str, "responses": [str, ...], "ranks": [int, ...]}`` with
  2 <= K <= 9 responses, 0 = best, equal ranks = tie; or pairwise
  ``{"prompt": str, "chosen": str, "rejected": str}``, read as K=2 with ranks ``[0, 1]``.
  A compared response may be empty: a policy sample that stops at once is real data the
  reward model must learn to score (its row is ``prompt + EOS``).

Every ``prompt`` may instead be a conversation, a list of ``{"role", "content"}`` messages
(roles ``system``, ``user``, ``assistant``; the last is ``user``), which the tokenizer renders
with its chat template (:mod:`rlhf_jax.data.chat`); the response is then the assistant's
reply, plain text.

Unknown extra fields are ignored (labeling tools add metadata). Every bad record raises
:class:`DataError` naming the file, the 1-based line and what is wrong, e.g.
``demos.jsonl:17: field "response" is empty``.
"""

from __future__ import annotations

import json
import pathlib
import unicodedata
from typing import Any, Callable, Iterator, Literal

from rlhf_jax.data.chat import MessageError, Prompt, check_messages

Kind = Literal["demonstrations", "text", "prompts", "responses", "comparisons"]
KINDS: tuple[str, ...] = ("demonstrations", "text", "prompts", "responses", "comparisons")
MIN_RESPONSES, MAX_RESPONSES = 2, 9  # the paper's labelers rank 4..9; pairwise data has 2
MAX_RANK = 2**31 - 1  # ranks are stored and batched as int32


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file and line."""


class _RecordError(Exception):
    """Raised inside a validator; the reader prefixes ``file:line``."""


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace and invisible format characters
    (zero-width space U+200B, joiners, BOM: Unicode category Cf), which tokenisers drop."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def check_text(value: str, what: str) -> None:
    """Refuses text that cannot be encoded: a lone surrogate (JSON's ``"\\ud800"`` escape
    decodes to one; no UTF-8 or tokeniser takes it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _RecordError(f"{what} holds a lone surrogate {value[err.start]!r} at character {err.start} "
                           "(not valid Unicode text)") from None


def _string(obj: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in obj:
        raise _RecordError(f'missing field "{name}"')
    value = obj[name]
    if not isinstance(value, str):
        raise _RecordError(f'field "{name}" must be a string, got {type(value).__name__}')
    check_text(value, f'field "{name}"')
    # A whitespace-only response tokenises to nothing: as useless as an empty one.
    if not allow_empty and is_blank(value):
        raise _RecordError(f'field "{name}" is empty' + (" (only invisible characters)" if value.strip() else ""))
    return value


def _prompt_field(obj: dict, *, allow_empty: bool = False) -> Prompt:
    """``obj["prompt"]``: a string, or a conversation (a list of messages)."""
    if isinstance(obj.get("prompt"), list):
        try:
            messages = check_messages(obj["prompt"])
        except MessageError as err:
            raise _RecordError(str(err)) from None
        for i, message in enumerate(messages):
            check_text(message["content"], f'field "prompt"[{i}] "content"')
        return messages
    return _string(obj, "prompt", allow_empty=allow_empty)


def _list(obj: dict, name: str) -> list:
    if name not in obj:
        raise _RecordError(f'missing field "{name}"')
    value = obj[name]
    if not isinstance(value, list):
        raise _RecordError(f'field "{name}" must be a list, got {type(value).__name__}')
    return value


def _demonstration(obj: dict) -> dict[str, Any]:
    # An empty prompt is legal: the response is then trained unconditionally.
    return {"prompt": _prompt_field(obj, allow_empty=True), "response": _string(obj, "response")}


def _text(obj: dict) -> dict[str, Any]:
    return {"text": _string(obj, "text")}


def _prompt(obj: dict) -> dict[str, Any]:
    # The sampler needs at least one prompt token to start from.
    return {"prompt": _prompt_field(obj)}


def _responses(obj: dict) -> dict[str, Any]:
    responses = _list(obj, "responses")
    if not MIN_RESPONSES <= len(responses) <= MAX_RESPONSES:
        raise _RecordError(f'field "responses" has {len(responses)} entries; a comparison needs '
                           f"{MIN_RESPONSES} to {MAX_RESPONSES}")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise _RecordError(f'field "responses"[{i}] must be a string, '
                               f"got {type(response).__name__}")
        check_text(response, f'field "responses"[{i}]')
    return {"prompt": _prompt_field(obj, allow_empty=True), "responses": list(responses)}


def _comparison(obj: dict) -> dict[str, Any]:
    prompt = _prompt_field(obj, allow_empty=True)
    if "responses" not in obj and ("chosen" in obj or "rejected" in obj):
        return {"prompt": prompt, "ranks": [0, 1],
                "responses": [_string(obj, "chosen", allow_empty=True),
                              _string(obj, "rejected", allow_empty=True)]}
    responses = _responses(obj)["responses"]
    ranks = _list(obj, "ranks")
    if len(ranks) != len(responses):
        raise _RecordError(f'field "ranks" has {len(ranks)} entries but "responses" has '
                           f"{len(responses)}")
    for i, rank in enumerate(ranks):
        # bool is an int subclass; true/false in a ranks list is a labeling-tool bug.
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise _RecordError(f'field "ranks"[{i}] must be an integer, got {type(rank).__name__}')
        if not 0 <= rank <= MAX_RANK:
            raise _RecordError(f'field "ranks"[{i}] is {rank}; ranks are 0 (best) to {MAX_RANK}')
    return {"prompt": prompt, "responses": list(responses), "ranks": list(ranks)}


_VALIDATORS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "demonstrations": _demonstration,
    "text": _text,
    "prompts": _prompt,
    "responses": _responses,
    "comparisons": _comparison,
}


def validate_record(obj: dict, kind: Kind) -> dict[str, Any]:
    """``obj`` checked as one ``kind`` record (what a reader would return for its line);
    raises :class:`DataError` saying what is wrong, for writers checking what they write."""
    try:
        return _VALIDATORS[kind](obj)
    except _RecordError as err:
        raise DataError(f"{kind} record: {err}") from None


def _parse(raw: bytes, is_last_unterminated: bool) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _RecordError(f"not valid UTF-8 (byte {err.start})") from err
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _RecordError("not valid JSON here: nested too deeply (a record is one flat object)") from None
    except json.JSONDecodeError as err:
        hint = " (truncated line?)" if is_last_unterminated else ""
        # json's "Unterminated string starting at" already ends in "at"
        raise _RecordError(f"not valid JSON{hint}: {err.msg.removesuffix(' at')} at column {err.colno}") from err
    if not isinstance(obj, dict):
        raise _RecordError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_records(path: str | pathlib.Path, kind: Kind) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line_number, record)`` for each non-empty line, validated for ``kind``.

    ``record`` holds only the schema's fields (pairwise comparisons are converted).
    Raises :class:`DataError` on a missing file or the first bad record.
    """
    if kind not in _VALIDATORS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    validate = _VALIDATORS[kind]
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({kind} JSONL expected)")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield number, validate(_parse(raw, not raw.endswith(b"\n")))
            except _RecordError as err:
                raise DataError(f"{path}:{number}: {err}") from None


def read_records(path: str | pathlib.Path, kind: Kind) -> list[tuple[int, dict[str, Any]]]:
    """All records of a file as ``(line_number, record)``; a file with none is an error."""
    records = list(iter_records(path, kind))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records
