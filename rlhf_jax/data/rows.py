"""Token rows: fitting examples to ``max_len``, splitting long texts, first-fit packing.

A *piece* is ``(tokens, targets)``: token ids and a 0/1 list marking which tokens are
training targets. A row holds one or more pieces, each its own segment (segment ids
1, 2, ...; positions restart at 0), then padding (segment 0, never a target). A
segment's first token is never a target: nothing before it in the segment predicts it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Piece = tuple[list[int], list[int]]


def fit_example(prompt: list[int], response: list[int], eos: int,
                max_len: int) -> tuple[list[int], int, bool]:
    """``prompt + response + [eos]`` cut to at most ``max_len`` tokens.

    Returns ``(tokens, n_prompt, truncated)``, ``n_prompt`` being how many leading tokens
    are prompt. When too long, the prompt keeps its *tail* (the words next to the
    response) and at least half the row if it is that long; the response keeps its *head*
    in the rest, losing EOS (a cut response has no end to learn). E.g. max_len=8, prompt
    of 6, response of 5 (+EOS = 6): the prompt keeps max(8 - 6, 8 // 2) = 4 tokens and the
    response its first 4, no EOS.
    """
    body = response + [eos]
    if len(prompt) + len(body) <= max_len:
        return prompt + body, len(prompt), False
    keep = min(len(prompt), max(max_len - len(body), max_len // 2))
    kept_prompt = prompt[len(prompt) - keep:]  # not prompt[-keep:], which is all of it at 0
    return kept_prompt + body[: max_len - keep], keep, True


def example_piece(tokens: list[int], n_prompt: int) -> Piece:
    """An SFT/ranking piece: targets on the response and EOS, but never on token 0."""
    targets = [0] * n_prompt + [1] * (len(tokens) - n_prompt)
    targets[0] = 0
    return tokens, targets


def text_chunks(tokens: list[int], eos: int, max_len: int) -> list[Piece]:
    """A text's ``tokens + [eos]`` as pieces of at most ``max_len`` tokens.

    Consecutive chunks overlap by one token, the overlap being the next chunk's
    (non-target) first token, so every token but the text's first is a target exactly
    once. E.g. 7 tokens + EOS with max_len=4: chunks [0:4], [3:7], [6:8].
    """
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: a text row needs at least 2 tokens")
    seq = tokens + [eos]
    starts = range(0, max(len(seq) - 1, 1), max_len - 1)
    chunks = [seq[s: s + max_len] for s in starts]
    return [(chunk, [0] + [1] * (len(chunk) - 1)) for chunk in chunks]


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items into rows of ``capacity``, each into the first row with room.

    Returns rows as lists of item indices, rows in the order they were opened and items in
    input order. O(n log n): a max-tree over rows' free space finds the leftmost row with
    room (rows not opened yet have all of it). E.g. lengths [3, 3, 2, 1], capacity 4: item 1
    does not fit row 0 (free 1) and opens row 1, item 2 fits neither and opens row 2, item
    3 fills row 0: [[0, 3], [1], [2]].
    """
    n = len(lengths)
    size = 1 << max(n - 1, 0).bit_length()
    free = [capacity] * (2 * size)  # free[node]: most free space of any row under node
    rows: list[list[int]] = []
    for item, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"item {item} has length {length}, not in 1..{capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack_row(pieces: Sequence[Piece], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Lays pieces side by side in one ``[max_len]`` row, then padding.

    Returns tokens (int32, ``pad_id`` on padding), loss_mask (float32), segment_ids
    (int32, 1.. per piece, 0 on padding) and positions (int32, from 0 in each piece).
    Zero pieces give an all-padding row.
    """
    tokens = np.full(max_len, pad_id, np.int32)
    loss_mask = np.zeros(max_len, np.float32)
    segment_ids = np.zeros(max_len, np.int32)
    positions = np.zeros(max_len, np.int32)
    at = 0
    for segment, (ids, targets) in enumerate(pieces, start=1):
        n = len(ids)
        if at + n > max_len:
            raise ValueError(f"pieces of {at + n} tokens do not fit max_len={max_len}")
        tokens[at: at + n] = ids
        loss_mask[at: at + n] = targets
        segment_ids[at: at + n] = segment
        positions[at: at + n] = np.arange(n)
        at += n
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": positions}
