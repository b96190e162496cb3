"""Row building blocks: fitting, text chunks, first-fit packing, row layout."""

import numpy as np
import pytest

from rlhf_jax.data.rows import example_piece, first_fit, fit_example, pack_row, text_chunks


def test_fit_example_fits_untouched():
    assert fit_example([5, 6], [7, 8], eos=1, max_len=5) == ([5, 6, 7, 8, 1], 2, False)


def test_fit_example_truncation_rule():
    prompt, response = list(range(10, 16)), list(range(20, 25))  # 6 + 5 + EOS = 12 > 8
    # Prompt keeps max(8 - 6, 8 // 2) = 4 tail tokens; response its first 4, no EOS.
    assert fit_example(prompt, response, 1, 8) == ([12, 13, 14, 15, 20, 21, 22, 23], 4, True)
    # Short response: the whole response + EOS stays, the prompt gives up its head.
    assert fit_example(prompt, [20], 1, 5) == ([13, 14, 15, 20, 1], 3, True)
    # Short prompt: kept whole, the response is cut.
    assert fit_example([10], response, 1, 4) == ([10, 20, 21, 22], 1, True)
    # Empty prompt: the response head alone.
    assert fit_example([], response, 1, 3) == ([20, 21, 22], 0, True)


def test_example_piece_targets_response_and_eos_not_first_token():
    assert example_piece([5, 6, 7, 1], 2) == ([5, 6, 7, 1], [0, 0, 1, 1])
    assert example_piece([7, 1], 0) == ([7, 1], [0, 1])  # empty prompt: token 0 has no predictor


def test_text_chunks_overlap_by_one():
    # 7 tokens + EOS = 8 with max_len 4: [0:4], [3:7], [6:8]; every token but the first is a
    # target exactly once: 3 + 3 + 1 = 7 = 8 - 1.
    chunks = text_chunks(list(range(10, 17)), eos=1, max_len=4)
    assert chunks == [([10, 11, 12, 13], [0, 1, 1, 1]), ([13, 14, 15, 16], [0, 1, 1, 1]),
                      ([16, 1], [0, 1])]
    assert text_chunks([10, 11], 1, 4) == [([10, 11, 1], [0, 1, 1])]
    # Exactly filling: 3 tokens + EOS = 4 -> one chunk, no trailing 1-token chunk.
    assert text_chunks([10, 11, 12], 1, 4) == [([10, 11, 12, 1], [0, 1, 1, 1])]


def test_first_fit_matches_naive_loop():
    assert first_fit([3, 3, 2, 1], 4) == [[0, 3], [1], [2]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=300).tolist()
    naive_free, naive_rows = [], []
    for i, n in enumerate(lengths):
        row = next((r for r, free in enumerate(naive_free) if free >= n), len(naive_rows))
        if row == len(naive_rows):
            naive_rows.append([])
            naive_free.append(16)
        naive_rows[row].append(i)
        naive_free[row] -= n
    assert first_fit(lengths, 16) == naive_rows
    with pytest.raises(ValueError, match="not in 1..16"):
        first_fit([17], 16)


def test_pack_row_layout():
    row = pack_row([([5, 6, 7, 1], [0, 0, 1, 1]), ([8, 9], [0, 1])], max_len=8, pad_id=0)
    np.testing.assert_array_equal(row["tokens"], [5, 6, 7, 1, 8, 9, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 0, 0])
    assert {k: v.dtype for k, v in row.items()} == {
        "tokens": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
        "positions": np.int32}
    empty = pack_row([], max_len=3, pad_id=9)
    np.testing.assert_array_equal(empty["tokens"], [9, 9, 9])
    assert not empty["loss_mask"].any() and not empty["segment_ids"].any()
