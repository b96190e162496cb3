"""SFT and pretraining-text loaders: masks, padding, packing, determinism, process slices."""

import numpy as np
import pytest
from data_testlib import EOS, PAD, data_cfg, word_ids, words

from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.loader import SFTBatches, TextBatches


def sft(path, tok, cache_dir, seed=0, **cfg):
    return SFTBatches(str(path), tok, data_cfg(**cfg), seed=seed, cache_dir=cache_dir)


def random_demos(n, seed=0, max_words=6):
    rng = np.random.default_rng(seed)
    return [{"prompt": words(int(rng.integers(0, 50)), int(rng.integers(0, max_words))),
             "response": words(int(rng.integers(50, 90)), int(rng.integers(1, max_words)))}
            for _ in range(n)]


def test_sft_row_loss_mask_is_response_and_eos(write_jsonl, tok, cache_dir):
    path = write_jsonl("d.jsonl", [{"prompt": "w1 w2", "response": "w3"},
                                   {"prompt": "w4", "response": "w5 w6 w7"}])
    batch = sft(path, tok, cache_dir, batch_size=2, max_len=8).get(0)
    # Row 0: w1 w2 | w3 <eos>: ids 4 5 | 6 1, then padding. Targets: w3 and <eos>.
    np.testing.assert_array_equal(batch.tokens, [[4, 5, 6, EOS, PAD, PAD, PAD, PAD],
                                                 [7, 8, 9, 10, EOS, PAD, PAD, PAD]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 1, 1, 0, 0, 0, 0],
                                                    [0, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 1, 0, 0, 0, 0],
                                                      [1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2, 3, 0, 0, 0, 0],
                                                    [0, 1, 2, 3, 4, 0, 0, 0]])
    assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == np.float32


def test_too_long_truncate_counts_and_error_names_line(write_jsonl, tok, cache_dir):
    demos = ([{"prompt": "w1", "response": "w2"}] * 3
             + [{"prompt": words(0, 6), "response": words(10, 5)}])
    path = write_jsonl("demos.jsonl", demos)
    loader = sft(path, tok, cache_dir, batch_size=4, max_len=8)
    assert loader.num_truncated == 1
    # 6 + 5 + EOS = 12 > 8: prompt tail w2..w5 (ids 5..8), response head w10..w13 (13..16).
    row = loader.get(0).tokens[3]
    np.testing.assert_array_equal(row, [5, 6, 7, 8, 13, 14, 15, 16])
    np.testing.assert_array_equal(loader.get(0).loss_mask[3], [0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(DataError, match=r"demos\.jsonl:4: prompt \+ response \+ EOS is 12 tokens, "
                                        r"more than data\.max_len=8"):
        sft(path, tok, cache_dir, max_len=8, on_too_long="error")


def _segments(batch):
    """Every (tokens, targets) segment of every row, checking row invariants on the way."""
    out = []
    for tokens, mask, seg, pos in zip(batch.tokens, batch.loss_mask, batch.segment_ids,
                                      batch.positions):
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()  # padding only at the end
        assert (tokens[n:] == PAD).all() and (mask[n:] == 0).all() and (pos[n:] == 0).all()
        assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
        for s in range(1, int(seg.max(initial=0)) + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart per segment
            assert mask[idx[0]] == 0  # nothing in the segment predicts its first token
            out.append((tokens[idx].tolist(), mask[idx].tolist()))
    return out


def _expected_piece(demo):
    prompt, response = word_ids(demo["prompt"]), word_ids(demo["response"])
    targets = [0] * len(prompt) + [1] * (len(response) + 1)
    targets[0] = 0
    return prompt + response + [EOS], targets


@pytest.mark.parametrize("packing", [False, True])
def test_every_example_once_per_eval_pass(write_jsonl, tok, cache_dir, packing):
    demos = random_demos(37)
    path = write_jsonl("d.jsonl", demos)
    loader = sft(path, tok, cache_dir, batch_size=4, max_len=16, packing=packing)
    pieces = [p for batch in loader.eval_batches() for p in _segments(batch)]
    assert sorted(pieces) == sorted(_expected_piece(d) for d in demos)
    if packing:  # 37 examples of <= 12 tokens in rows of 16: packing saves rows
        assert loader.num_rows < 37
    else:
        assert loader.num_rows == 37 and loader.num_eval_batches() == 10  # ceil(37 / 4)
        last = list(loader.eval_batches())[-1]  # rows 36..39: one real, three padding
        assert last.loss_mask[1:].sum() == 0 and last.segment_ids[1:].sum() == 0


def test_packing_rows_hold_several_examples(write_jsonl, tok, cache_dir):
    demos = [{"prompt": "w1", "response": "w2"}] * 4  # 3 tokens each
    path = write_jsonl("d.jsonl", demos)
    batch = sft(path, tok, cache_dir, batch_size=1, max_len=8, packing=True).get(0)
    # First fit: examples 0 and 1 share row 0 (6 tokens), 2 and 3 row 1.
    np.testing.assert_array_equal(batch.tokens, [[4, 5, EOS, 4, 5, EOS, PAD, PAD]])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 2, 2, 2, 0, 0]])
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2, 0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 1, 1, 0, 1, 1, 0, 0]])


def _rows(batch):
    return [tuple(r) for r in batch.tokens.tolist()]


def test_deterministic_epochs_and_resume(write_jsonl, tok, cache_dir):
    path = write_jsonl("d.jsonl", random_demos(24, max_words=4))
    a = sft(path, tok, cache_dir, seed=3, batch_size=4, shuffle=True)
    assert a.steps_per_epoch == 6
    run = [a.get(s) for s in range(18)]  # three epochs
    # A fresh loader asked for steps out of order (a resumed run) gets the same batches.
    b = sft(path, tok, cache_dir, seed=3, batch_size=4, shuffle=True)
    for s in (13, 2, 17, 6):
        for field in ("tokens", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(b.get(s), field), getattr(run[s], field))
    epochs = [[r for s in range(e * 6, e * 6 + 6) for r in _rows(run[s])] for e in range(3)]
    every_row = sorted(r for batch in a.eval_batches() for r in _rows(batch))
    for epoch in epochs:
        assert sorted(epoch) == every_row  # 24 rows, 6 batches of 4: each row once ...
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # ... in a new order each epoch
    c = sft(path, tok, cache_dir, seed=4, batch_size=4, shuffle=True)
    assert [r for s in range(6) for r in _rows(c.get(s))] != epochs[0]  # the seed matters


@pytest.mark.parametrize("packing", [False, True])
def test_two_process_slices_concatenate_to_global_batch(write_jsonl, tok, cache_dir, packing):
    path = write_jsonl("d.jsonl", random_demos(30))
    cfg = data_cfg(batch_size=4, shuffle=True, packing=packing)
    one = SFTBatches(str(path), tok, cfg, seed=7, cache_dir=cache_dir)
    two = [SFTBatches(str(path), tok, cfg, seed=7, cache_dir=cache_dir, process_index=p,
                      process_count=2) for p in range(2)]
    assert two[0].local_batch_size == 2 and two[0].steps_per_epoch == one.steps_per_epoch
    for step in (0, 1, one.steps_per_epoch, 2 * one.steps_per_epoch + 1):  # into later epochs
        whole = one.get(step)
        parts = [loader.get(step) for loader in two]
        for field in ("tokens", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(
                np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field))
    for whole, *parts in zip(one.eval_batches(), *(loader.eval_batches() for loader in two)):
        np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)


def test_batch_and_process_errors(write_jsonl, tok, cache_dir):
    path = write_jsonl("d.jsonl", random_demos(3))
    loader = sft(path, tok, cache_dir, batch_size=4)
    assert loader.steps_per_epoch == 0 and loader.num_eval_batches() == 1  # eval still works
    with pytest.raises(DataError, match="d.jsonl: 3 rows, fewer than one batch"):
        loader.get(0)
    with pytest.raises(DataError, match="multiple of the 3 processes"):
        SFTBatches(str(path), tok, data_cfg(batch_size=4), seed=0, cache_dir=cache_dir,
                   process_index=0, process_count=3)


def test_text_rows_split_long_texts(write_jsonl, tok, cache_dir):
    path = write_jsonl("t.jsonl", [{"text": words(0, 7)}, {"text": "w20"}])
    loader = TextBatches(str(path), tok, data_cfg(batch_size=1, max_len=4), seed=0,
                         cache_dir=cache_dir)
    # Text 0: ids 3..9 + EOS in chunks [3 4 5 6] [6 7 8 9] [9 EOS]; text 1: [23 EOS].
    rows = [b.tokens[0].tolist() for b in loader.eval_batches()]
    assert rows == [[3, 4, 5, 6], [6, 7, 8, 9], [9, EOS, PAD, PAD], [23, EOS, PAD, PAD]]
    masks = [b.loss_mask[0].tolist() for b in loader.eval_batches()]
    assert masks == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0]]
    # Targets: every token but each text's first, once: 7 + 1 = 8.
    assert sum(sum(m) for m in masks) == 8
    packed = TextBatches(str(path), tok, data_cfg(batch_size=1, max_len=4, packing=True),
                         seed=0, cache_dir=cache_dir)
    # First fit: [9 EOS] and [23 EOS] share a row.
    assert [b.tokens[0].tolist() for b in packed.eval_batches()] == [
        [3, 4, 5, 6], [6, 7, 8, 9], [9, EOS, 23, EOS]]
    assert next(iter(packed.eval_batches())).segment_ids.shape == (1, 4)
