"""Reward-model comparisons (RankingBatch) and PPO prompts (left-padded TokenBatch)."""

import numpy as np
import pytest
from data_testlib import EOS, PAD, data_cfg, words

from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.prompts import PromptBatches
from rlhf_jax.data.ranking import RankingBatches
from rlhf_jax.types import RankingBatch, TokenBatch


def test_ranking_batch_varying_k_and_ties(write_jsonl, tok, cache_dir):
    path = write_jsonl("c.jsonl", [
        {"prompt": "w1", "responses": ["w2", "w3 w4", "w5"], "ranks": [1, 0, 1]},  # tie: 0 and 2
        {"prompt": "w6 w7", "chosen": "w8", "rejected": "w9 w10 w11"},  # pairwise -> K=2
        {"prompt": "w1", "chosen": "w2", "rejected": ""},  # an empty sample: prompt + EOS
    ])
    loader = RankingBatches(str(path), tok, data_cfg(batch_size=2, max_len=6), seed=0, k_max=4,
                            cache_dir=cache_dir)
    batch = loader.get(0)
    assert isinstance(batch, RankingBatch)
    assert batch.tokens.shape == (2, 4, 6) and batch.mask.shape == (2, 4)
    # Prompt 0, response 1: w1 | w3 w4 <eos> = 4 | 6 7 1; its last token (EOS) at index 3.
    np.testing.assert_array_equal(batch.tokens[0], [[4, 5, EOS, PAD, PAD, PAD],
                                                    [4, 6, 7, EOS, PAD, PAD],
                                                    [4, 8, EOS, PAD, PAD, PAD],
                                                    [PAD] * 6])
    np.testing.assert_array_equal(batch.segment_ids[0], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                                         [1, 1, 1, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch.positions[0, 1], [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(batch.last_index, [[2, 3, 2, 0], [3, 5, 0, 0]])
    np.testing.assert_array_equal(batch.ranks, [[1, 0, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(batch.mask, [[True, True, True, False],
                                               [True, True, False, False]])
    assert batch.tokens[batch.mask].shape == (5, 6)  # 3 + 2 real responses
    # The reward is read at the EOS of every real response here (nothing truncated).
    assert (np.take_along_axis(batch.tokens, batch.last_index[..., None], 2)[..., 0][batch.mask]
            == EOS).all()
    assert loader.num_truncated == 0
    # Comparison 3 (first row of eval batch 1): the empty response is w1 <eos>, read at 1.
    third = list(loader.eval_batches())[1]
    np.testing.assert_array_equal(third.tokens[0, 1], [4, EOS, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(third.last_index[0], [2, 1, 0, 0])
    assert not third.mask[1].any()  # the padding comparison filling the batch


def test_ranking_limits(write_jsonl, tok, cache_dir):
    path = write_jsonl("cmp.jsonl", [
        {"prompt": "w1", "chosen": "w2", "rejected": "w3"},
        {"prompt": "w1", "responses": ["w2", "w3", "w4"], "ranks": [0, 1, 2]}])
    with pytest.raises(DataError, match=r"cmp\.jsonl:2: 3 responses, more than k_max=2"):
        RankingBatches(str(path), tok, data_cfg(), seed=0, k_max=2, cache_dir=cache_dir)
    long = write_jsonl("long.jsonl",
                       [{"prompt": words(0, 5), "chosen": "w9", "rejected": words(10, 9)}])
    with pytest.raises(DataError,
                       match=r"long\.jsonl:1: prompt \+ responses\[1\] \+ EOS is 15 tokens"):
        RankingBatches(str(long), tok, data_cfg(max_len=8, on_too_long="error"), seed=0,
                       cache_dir=cache_dir)
    loader = RankingBatches(str(long), tok, data_cfg(batch_size=1, max_len=8), seed=0, k_max=2,
                            cache_dir=cache_dir)
    assert loader.num_truncated == 1
    batch = loader.get(0)
    # Rejected: prompt keeps max(8 - 10, 4) = 4 tail tokens, response its first 4, no EOS.
    np.testing.assert_array_equal(batch.tokens[0, 1], [4, 5, 6, 7, 13, 14, 15, 16])
    np.testing.assert_array_equal(batch.last_index, [[6, 7]])
    with pytest.raises(DataError, match="packing"):
        RankingBatches(str(path), tok, data_cfg(packing=True), seed=0, cache_dir=cache_dir)


def test_ranking_eval_pads_with_masked_comparisons(write_jsonl, tok, cache_dir):
    path = write_jsonl("c.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}] * 3)
    loader = RankingBatches(str(path), tok, data_cfg(batch_size=2, max_len=6), seed=0,
                            cache_dir=cache_dir)
    batches = list(loader.eval_batches())
    assert len(batches) == 2 and batches[0].tokens.shape == (2, 9, 6)  # default k_max = 9
    assert batches[0].mask[:, :2].all() and not batches[0].mask[:, 2:].any()
    assert batches[1].mask[0, :2].all() and not batches[1].mask[1].any()  # 4th slot: padding


def test_prompts_left_padded(write_jsonl, tok, cache_dir):
    path = write_jsonl("p.jsonl", [{"prompt": "w1 w2"}, {"prompt": words(0, 7)}])
    loader = PromptBatches(str(path), tok, data_cfg(batch_size=2, max_len=5), seed=0,
                           cache_dir=cache_dir)
    batch = loader.get(0)
    assert isinstance(batch, TokenBatch)
    # Row 1 is 7 tokens > 5: its tail w2..w6 (ids 5..9) is kept.
    np.testing.assert_array_equal(batch.tokens, [[PAD, PAD, PAD, 4, 5], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(batch.segment_ids, [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch.positions, [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4]])
    assert not batch.loss_mask.any()
    assert loader.num_truncated == 1
    with pytest.raises(DataError,
                       match=r"p\.jsonl:2: the prompt is 7 tokens, more than data\.max_len=5"):
        PromptBatches(str(path), tok, data_cfg(max_len=5, on_too_long="error"), seed=0,
                      cache_dir=cache_dir)
