"""OpenAssistant oasst1 (and oasst2): message trees (``*.trees.jsonl.gz``, each line
``{"message_tree_id", "prompt": message}`` with nested ``replies``) or flat messages
(``*.messages.jsonl.gz``, the HF parquet) linked by ``parent_id``.

Sibling assistant replies carry ``rank`` (0 = best, from the labelers' ranking). Each
prompter message with two or more ranked replies gives one K-wise comparison (the 9 best
if more), its prompt the conversation from the root (``prompter`` -> user); each rank-0
reply is also a demonstration. A message that is ``deleted``, failed review
(``review_result`` false: spam), is not reviewed (``review_result`` missing) or is empty
is dropped with everything under it; so is a message whose parent is not in the file.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable

from rlhf_jax.data.public.output import Sink
from rlhf_jax.data.public.reading import Row
from rlhf_jax.data.public.records import BadRecord, field

ROLES = {"prompter": "user", "assistant": "assistant"}


def _rank(message: dict[str, Any]) -> int | None:
    rank = message.get("rank")
    if rank is None or (isinstance(rank, float) and math.isnan(rank)):  # parquet may write null as NaN
        return None
    return int(rank)


def _unusable(message: dict[str, Any]) -> str | None:
    """Why a message is dropped, or None to keep it."""
    if message.get("deleted"):
        return "message: deleted"
    if message.get("review_result") is False:
        return "message: failed review"
    if message.get("review_result") is None:
        return "message: not reviewed"
    if not message["text"].strip():
        return "message: empty"
    return None


class _Walker:
    """Walks one tree's messages; ``children(message)`` gives its replies in file order."""

    def __init__(self, out: Sink, children, where):
        self.out, self.children, self.where = out, children, where

    def check(self, message: Any, what: str) -> dict[str, Any]:
        if not isinstance(message, dict):
            raise BadRecord(f"{what} must be an object, got {type(message).__name__}")
        field(message, "text", str, f'field "{what}.text"')
        role = field(message, "role", str, f'field "{what}.role"')
        if role not in ROLES:
            raise BadRecord(f'field "{what}.role" is {role!r}; expected "prompter" or "assistant"')
        return message

    def count_dropped(self, message: dict[str, Any], reason: str) -> None:
        self.out.drop(reason)
        below = sum(1 for _ in self.descendants(message))
        if below:
            self.out.drop("message: under a dropped one", below)

    def descendants(self, message: dict[str, Any]):
        for child, _ in self.children(message):
            yield child
            yield from self.descendants(child)

    def kept_replies(self, message: dict[str, Any], role: str) -> list[dict[str, Any]]:
        """``message``'s replies, which must have ``role``, less the dropped ones (counted)."""
        kept = []
        for reply, what in self.children(message):
            self.out.where = self.where(reply, what)
            self.check(reply, what)
            if reply["role"] != role:
                raise BadRecord(f'field "{what}.role" is {reply["role"]!r}; a reply to a {message["role"]} '
                                f"message is an {role} message")
            reason = _unusable(reply)
            if reason:
                self.count_dropped(reply, reason)
            else:
                kept.append(reply)
        return kept

    def prompter(self, message: dict[str, Any], context: list[dict[str, str]]) -> None:
        """A kept prompter message: its ranked replies, then each kept reply's subtree."""
        context = context + [{"role": "user", "content": message["text"]}]
        kept = self.kept_replies(message, "assistant")
        ranked = [r for r in kept if _rank(r) is not None]
        if len(ranked) >= 2:
            self.out.comparison(context, [r["text"] for r in ranked], [_rank(r) for r in ranked])
        elif kept:
            self.out.drop("prompt: fewer than 2 ranked replies")
        for reply in kept:
            if _rank(reply) == 0:
                self.out.demonstration(context, reply["text"])
            reply_context = context + [{"role": "assistant", "content": reply["text"]}]
            for follow_up in self.kept_replies(reply, "prompter"):
                self.prompter(follow_up, reply_context)

    def root(self, message: dict[str, Any], what: str) -> None:
        self.check(message, what)
        if message["role"] != "prompter":
            raise BadRecord(f'field "{what}.role": a tree starts with a prompter message')
        reason = _unusable(message)
        if reason:
            self.count_dropped(message, reason)
        else:
            self.prompter(message, [])


def _convert_trees(rows: list[Row], out: Sink) -> None:
    for where, tree in rows:
        def children(message, where=where):
            replies = message.get("replies") or []
            if not isinstance(replies, list):
                raise BadRecord('field "replies" must be a list')
            return [(reply, "reply") for reply in replies]

        out.where = where
        _Walker(out, children, lambda _m, _w, where=where: where).root(field(tree, "prompt", dict), "prompt")


def _convert_messages(rows: list[Row], out: Sink) -> None:
    by_parent: dict[Any, list[Row]] = collections.defaultdict(list)
    where_of: dict[int, str] = {}
    ids = set()
    for where, message in rows:
        out.where = where
        ids.add(field(message, "message_id", str))
        by_parent[message.get("parent_id")].append((where, message))
        where_of[id(message)] = where
    walker = _Walker(out, lambda m: [(child, "message") for _, child in by_parent.get(m["message_id"], [])],
                     lambda m, _what: where_of[id(m)])
    for where, root in by_parent.get(None, []):
        out.where = where
        walker.root(root, "message")
    for parent, orphans in by_parent.items():
        if parent is not None and parent not in ids:
            for _, orphan in orphans:
                walker.count_dropped(orphan, "message: parent not in the file")


def convert_file(rows: Iterable[Row], out: Sink) -> None:
    """One file: trees (``message_tree_id`` + ``prompt``) or flat messages (``message_id``)."""
    rows = list(rows)
    if not rows:
        return
    where, first = rows[0]
    if "prompt" in first and "message_tree_id" in first:
        _convert_trees(rows, out)
    elif "message_id" in first:
        _convert_messages(rows, out)
    else:
        out.where = where
        raise BadRecord("neither a message tree (message_tree_id, prompt) nor a message (message_id, parent_id)")
