"""What every converter uses to read a public record: typed field access that names the
field when the record is not in the expected layout, and conversations as our messages."""

from __future__ import annotations

import math
from typing import Any

from rlhf_jax.data.chat import Message, MessageError, check_messages


class BadRecord(Exception):
    """A record not in the format's layout; the driver prefixes where it is and the format."""


class Unusable(Exception):
    """A record in the layout that cannot be used; ``reason`` is counted as a drop."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str = "") -> Any:
    """``obj[name]``, which must be a ``kind``; ``what`` names it in errors (default ``name``)."""
    what = what or f'field "{name}"'
    if name not in obj:
        raise BadRecord(f"missing {what}")
    value = obj[name]
    # bool is an int subclass, and a true/false where a number belongs is a layout error
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        expected = " or ".join(t.__name__ for t in _types(kind))
        raise BadRecord(f"{what} must be {expected}, got {type(value).__name__}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def number(value: Any) -> float | None:
    """A score as a float; None for a missing one (None, NaN: parquet writes a null as NaN)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def conversation(value: Any) -> list[Message]:
    """A message list ending with a user turn, or :class:`Unusable` saying why not."""
    try:
        return check_messages(value)
    except MessageError as err:
        raise Unusable(err.reason) from None


def dense_ranks(scores: list[float]) -> list[int]:
    """Higher score, better rank: 0 for the best, equal scores the same rank (a tie).
    E.g. [2.5, 4.0, 2.5, 1.0] -> [1, 0, 1, 2]."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]
