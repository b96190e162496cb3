"""PPO prompts as left-padded :class:`~rlhf_jax.types.TokenBatch` rows."""

from __future__ import annotations

import numpy as np

from rlhf_jax.config import DataConfig
from rlhf_jax.data.chat import Prompt
from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.loader import RowBatches, record_prompt_ids, too_long_error
from rlhf_jax.data.tfds_store import open_store
from rlhf_jax.data.tokenizer import TextTokenizer


class PromptBatches(RowBatches):
    """Prompts ``[B/P, P]`` with ``P = data.max_len``, padded on the *left*.

    Left padding puts every prompt's last token in column ``P - 1``, so sampling starts
    at the same column for the whole batch. tokens: ``pad_id`` then the prompt;
    segment_ids: 0 on padding, 1 on the prompt; positions: 0 on padding, 0..n-1 on the
    prompt; loss_mask: all 0 (a prompt token is never a target). Too long:
    ``on_too_long='truncate'`` keeps the prompt's tail (the words the response follows)
    and counts it in ``num_truncated``; ``'error'`` raises naming file and line.
    ``prompts[i]`` is record ``i``'s prompt as the file gives it (text or a conversation).
    """

    def __init__(self, path: str, tokenizer: TextTokenizer, cfg: DataConfig, *, seed: int,
                 cache_dir: str, process_index: int = 0, process_count: int = 1):
        if cfg.packing:
            raise DataError("data.packing=True does not apply to prompts: each is its own row")
        source = open_store(path, "prompts", cache_dir)
        self.tokenizer = tokenizer
        self.prompt_len = cfg.max_len
        self.num_truncated = 0
        self._ids = []  # per record: the prompt's ids
        self.prompts: list[Prompt] = []
        for record in source:
            self.prompts.append(record["prompt"])
            self._ids.append(record_prompt_ids(source, record, tokenizer))
            n = len(self._ids[-1])
            if n == 0:
                raise DataError(f"{source.path}:{record['line']}: the prompt encodes to no tokens")
            if n > cfg.max_len:
                if cfg.on_too_long == "error":
                    raise too_long_error(source, record, "the prompt", n, cfg.max_len)
                self.num_truncated += 1
        super().__init__(source, [(i,) for i in range(len(source))],
                         batch_size=cfg.batch_size, seed=seed,
                         shuffle=cfg.shuffle, process_index=process_index,
                         process_count=process_count)

    def global_prompts(self, step: int) -> list[Prompt]:
        """The prompts of global batch ``step`` as the file gives them, in gathered-row order."""
        return [self.prompts[row[0]] for row in self.global_rows(step)]

    def _assemble(self, row: tuple[int, ...]) -> dict[str, np.ndarray]:
        length = self.prompt_len
        out = {"tokens": np.full(length, self.tokenizer.pad_id, np.int32),
               "loss_mask": np.zeros(length, np.float32),
               "segment_ids": np.zeros(length, np.int32),
               "positions": np.zeros(length, np.int32)}
        if not row:  # a padding row
            return out
        tokens = self._ids[row[0]][-length:]
        n = len(tokens)
        out["tokens"][length - n:] = tokens
        out["segment_ids"][length - n:] = 1
        out["positions"][length - n:] = np.arange(n)
        return out
