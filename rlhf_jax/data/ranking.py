"""Comparisons for the reward model as :class:`~rlhf_jax.types.RankingBatch`."""

from __future__ import annotations

import numpy as np

from rlhf_jax.config import DataConfig
from rlhf_jax.data.jsonl import MAX_RESPONSES, MIN_RESPONSES, DataError
from rlhf_jax.data.loader import RowBatches, record_prompt_ids, too_long_error
from rlhf_jax.data.rows import example_piece, fit_example
from rlhf_jax.data.tfds_store import open_store
from rlhf_jax.data.tokenizer import TextTokenizer, encode_ids
from rlhf_jax.types import RankingBatch


class RankingBatches(RowBatches):
    """One comparison per batch element: ``[B/P, k_max, max_len]`` rows, one per response.

    Each response ``k`` is its own ``prompt + response + EOS`` row (segment 1, positions
    from 0, ``pad_id`` after), so a prompt costs K forward passes whatever the number of
    pairs. ``last_index[b, k]`` is the row's last token (the EOS unless truncated), where
    the reward is read; ``response_mask`` marks the response tokens and EOS (whose
    log-probs DPO sums). Prompts with K < ``k_max`` get all-padding rows with ``mask``
    False, ``rank`` 0 and ``last_index`` 0. Too long: as
    :class:`~rlhf_jax.data.loader.SFTBatches`; ``num_truncated`` counts responses.
    Packing does not apply (each response must be a separate row).
    """

    def __init__(self, path: str, tokenizer: TextTokenizer, cfg: DataConfig, *, seed: int,
                 cache_dir: str, k_max: int = MAX_RESPONSES, process_index: int = 0,
                 process_count: int = 1):
        if cfg.packing:
            raise DataError("data.packing=True does not apply to comparisons: every response "
                            "is its own row")
        if k_max < MIN_RESPONSES:
            raise DataError(f"k_max={k_max}: a comparison has at least {MIN_RESPONSES} responses")
        source = open_store(path, "comparisons", cache_dir)
        self.tokenizer = tokenizer
        self.max_len = cfg.max_len
        self.k_max = k_max
        self.num_truncated = 0
        ordered_pairs = distinct_pairs = 0
        self._records = []  # per record: (prompt ids, [response ids], ranks)
        for record in source:
            ranks = record["ranks"]
            if len(record["responses"]) > k_max:
                raise DataError(f"{source.path}:{record['line']}: {len(record['responses'])} "
                                f"responses, more than k_max={k_max}")
            prompt = record_prompt_ids(source, record, tokenizer)
            responses = [encode_ids(tokenizer, response) for response in record["responses"]]
            ordered, distinct = _informative_pairs(ranks, responses)
            ordered_pairs, distinct_pairs = ordered_pairs + ordered, distinct_pairs + distinct
            self._records.append((prompt, responses, list(record["ranks"])))
            for i, response in enumerate(responses):
                n = len(prompt) + len(response) + 1
                if n > cfg.max_len:
                    if cfg.on_too_long == "error":
                        raise too_long_error(source, record, f"prompt + responses[{i}] + EOS", n,
                                        cfg.max_len)
                    self.num_truncated += 1
        if len(source) and not ordered_pairs:  # the ranking loss drops ties: nothing to learn
            raise DataError(f"{source.path}: every comparison is a tie ({len(source)} comparisons, "
                            "0 pairs with different ranks); the reward model has nothing to learn from")
        self.ranked_pairs, self.distinct_pairs = ordered_pairs, distinct_pairs
        super().__init__(source, [(i,) for i in range(len(source))],
                         batch_size=cfg.batch_size, seed=seed,
                         shuffle=cfg.shuffle, process_index=process_index,
                         process_count=process_count)

    def require_distinct_pairs(self) -> "RankingBatches":
        """Refuses a training set in which every ranked pair compares identical responses
        (``chosen == rejected``): r(x, y) - r(x, y) = 0, so the RM would train with zero
        gradient and export at accuracy 0.5."""
        if self.num_rows and not self.distinct_pairs:
            raise DataError(f"{self.source.path}: every pair with different ranks compares identical responses "
                            f"({self.num_rows} comparisons, {self.ranked_pairs} ranked pairs, 0 of them between "
                            "responses that tokenise differently); the reward model has nothing to learn from")
        return self

    def _assemble(self, row: tuple[int, ...]) -> dict[str, np.ndarray]:
        shape = (self.k_max, self.max_len)
        out = {"tokens": np.full(shape, self.tokenizer.pad_id, np.int32),
               "segment_ids": np.zeros(shape, np.int32),
               "positions": np.zeros(shape, np.int32),
               "response_mask": np.zeros(shape, np.float32),
               "last_index": np.zeros(self.k_max, np.int32),
               "ranks": np.zeros(self.k_max, np.int32),
               "mask": np.zeros(self.k_max, bool)}
        if not row:  # a padding row
            return out
        prompt, responses, ranks = self._records[row[0]]
        for k, (response, rank) in enumerate(zip(responses, ranks)):
            tokens, n_prompt, _ = fit_example(prompt.tolist(), response.tolist(), self.tokenizer.eos_id,
                                              self.max_len)
            n = len(tokens)
            out["tokens"][k, :n] = tokens
            out["response_mask"][k, :n] = example_piece(tokens, n_prompt)[1]
            out["segment_ids"][k, :n] = 1
            out["positions"][k, :n] = np.arange(n)
            out["last_index"][k] = n - 1
            out["ranks"][k] = rank
            out["mask"][k] = True
        return out

    def _to_batch(self, arrays: dict[str, np.ndarray]) -> RankingBatch:
        return RankingBatch(**arrays)


def _informative_pairs(ranks: list[int], responses: list[np.ndarray]) -> tuple[int, int]:
    """(pairs with different ranks, those of them whose responses' token ids differ)."""
    ordered = [(i, j) for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] != ranks[j]]
    return len(ordered), sum(not np.array_equal(responses[i], responses[j]) for i, j in ordered)
