"""Who sees which item, in which order, with its responses in which order.

Every order is a pure function of the labeler's name and the item ids (seeded from a hash),
so a restart or a reload shows the same thing, and a record can say what was shown.

- :func:`display_order`: the responses of one item in a random order per labeler and item.
  Always showing them in file order builds position bias into the labels: an untouched
  submission, and every tired labeler, favours the first response.
- :func:`queue_order`: a labeler's items. The overlap items (which every labeler labels,
  to measure agreement) come early, so agreement is known soon, but mixed with as many
  other items, so a labeler cannot tell which ones are the checks.
- :func:`visible_items`: the queue without the items another labeler already labeled
  (an overlap item stays in every queue).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any


def _rng(*parts: str) -> random.Random:
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def display_order(labeler: str, item_id: str, k: int) -> list[int]:
    """The response indices in the order ``labeler`` is first shown item ``item_id`` (``k`` responses)."""
    order = list(range(k))
    _rng("display", labeler, item_id).shuffle(order)
    return order


def queue_order(labeler: str, items: list[dict[str, Any]]) -> list[str]:
    """Every item id, in the order ``labeler`` works through them: the overlap items shuffled
    together with as many non-overlap ones, then the remaining non-overlap items shuffled."""
    rng = _rng("queue", labeler)
    overlap = [i["id"] for i in items if i["overlap"]]
    others = [i["id"] for i in items if not i["overlap"]]
    rng.shuffle(others)
    head = overlap + others[:len(overlap)]
    rng.shuffle(head)
    return head + others[len(overlap):]


def visible_items(labeler: str, items: list[dict[str, Any]], labeled_by_others: set[str]) -> list[str]:
    """The item ids ``labeler`` is shown, in their order: each overlap item, and each other
    item nobody else has labeled. Two labelers who open the same such item at once may both
    label it: a second label of one comparison, not a loss."""
    overlap = {i["id"] for i in items if i["overlap"]}
    return [i for i in queue_order(labeler, items) if i in overlap or i not in labeled_by_others]
