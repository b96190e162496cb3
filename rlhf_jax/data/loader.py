"""Deterministic, random-access, process-local batches fed by grain.

Every loader turns a stored JSONL file (:mod:`rlhf_jax.data.tfds_store`) into a list of
*rows* fixed at construction, then serves them through
``grain.MapDataset.source(rows).shuffle(seed).map(assemble).batch(local_batch_size)``.
Global batch ``step`` is rows ``[k*B, (k+1)*B)`` of epoch ``e``'s permutation, where
``e, k = divmod(step, steps_per_epoch)``; grain's shuffle draws each epoch's permutation
from ``seed + e`` alone, so a run resumed at step n gets exactly the batches an
uninterrupted run got. Process ``p`` of ``P`` reads only its ``B/P`` rows of each batch.
An epoch's last partial batch is dropped (a different one each epoch, as orders differ).

Construction tokenises every record once, to fix the row layout, count truncations and fail
fast on records ``on_too_long='error'`` rejects, and keeps the token ids (int32 arrays, 4
bytes a token); ``get`` only packs them into rows. Reading and tokenising each record again
at every step cost ~4 ms a batch of 8 on a 2-core CPU, 5x the step of a small model, and the
loop's prefetch thread shares the interpreter lock with the step's dispatch.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax.config import DataConfig
from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.rows import example_piece, first_fit, fit_example, pack_row, text_chunks
from rlhf_jax.data.tfds_store import RecordSource, open_store
from rlhf_jax.data.tokenizer import TextTokenizer, encode_ids, prompt_ids
from rlhf_jax.sharding import batch_sharding
from rlhf_jax.types import RankingBatch, TokenBatch


class RowBatches(abc.ABC):
    """Shared batching over a fixed list of rows; subclasses define a row's arrays.

    ``rows[i]`` is a tuple ``_assemble`` understands; ``()`` is a padding row (only
    ``eval_batches`` uses them; not ``None``, which grain's map takes for a filtered-out
    element). Attributes: ``num_rows``, ``steps_per_epoch``,
    ``global_batch_size``, ``local_batch_size``, ``source`` (its ``path`` names the file).
    """

    def __init__(self, source: RecordSource, rows: Sequence[tuple], *, batch_size: int,
                 seed: int, shuffle: bool, process_index: int, process_count: int):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} is not in [0, {process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise DataError(f"data.batch_size={batch_size} must be a positive multiple of the "
                            f"{process_count} processes")
        self.source = source
        self._rows = list(rows)
        self.num_rows = len(self._rows)
        self.global_batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.steps_per_epoch = self.num_rows // batch_size
        self._process_index, self._process_count = process_index, process_count
        ordered = grain.MapDataset.source(self._rows)
        self._ordered = ordered.shuffle(seed=seed) if shuffle else ordered  # [i]: i-th row drawn, all epochs
        # Grain batches within an epoch of rows: with drop_remainder it has
        # num_rows // local_batch_size local batches per epoch.
        self._train = self._ordered.map(self._assemble).batch(self.local_batch_size, drop_remainder=True)
        self._local_per_epoch = self.num_rows // self.local_batch_size

    def require_one_batch(self, field: str) -> "RowBatches":
        """Refuses a training set with fewer rows than one batch (it would train 0 steps and
        export the untrained init); ``field`` names the batch size, e.g. ``sft.data.batch_size``."""
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.source.path}: {self.num_rows} rows, fewer than one batch of "
                            f"{field}={self.global_batch_size}; add rows or lower {field}")
        return self

    @abc.abstractmethod
    def _assemble(self, row: tuple) -> dict[str, np.ndarray]:
        """One row's arrays (all padding for ``()``); runs inside grain's map."""

    def _to_batch(self, arrays: dict[str, np.ndarray]) -> Any:
        return TokenBatch(**arrays)

    def get(self, step: int):
        """This process's rows of global batch ``step`` (numpy arrays, leading dim B/P)."""
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.source.path}: {self.num_rows} rows, fewer than one batch of "
                            f"data.batch_size={self.global_batch_size}")
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        index = epoch * self._local_per_epoch + k * self._process_count + self._process_index
        return self._to_batch(self._train[index])

    def global_rows(self, step: int) -> list[tuple]:
        """The rows of global batch ``step``, every process's in process order: row ``r`` of
        the gathered batch is ``global_rows(step)[r]`` (what ``_assemble`` was given)."""
        epoch, k = divmod(int(step), self.steps_per_epoch)
        # local batch j of an epoch holds drawn rows [j*b, (j+1)*b) of it (grain's batch)
        first = epoch * self.num_rows + k * self._process_count * self.local_batch_size
        return [self._ordered[first + i] for i in range(self.global_batch_size)]

    def num_eval_batches(self) -> int:
        return math.ceil(self.num_rows / self.global_batch_size)

    def eval_batches(self) -> Iterator[Any]:
        """Every row once, in file order; the last batch is filled with padding rows.

        Padding rows have loss_mask 0 (ranking: mask False), so sums over a pass count
        each real example exactly once. Every process yields ``num_eval_batches()``.
        """
        total = self.num_eval_batches() * self.global_batch_size
        rows = self._rows + [()] * (total - self.num_rows)
        batches = grain.MapDataset.source(rows).map(self._assemble).batch(self.local_batch_size)
        for b in range(self.num_eval_batches()):
            yield self._to_batch(batches[b * self._process_count + self._process_index])


def record_prompt_ids(source: RecordSource, record: dict, tokenizer: TextTokenizer) -> np.ndarray:
    """A stored record's prompt ids (:func:`~rlhf_jax.data.tokenizer.prompt_ids`); an error
    names the record's file and line."""
    try:
        return prompt_ids(tokenizer, record["prompt"])
    except DataError as err:
        raise DataError(f"{source.path}:{record['line']}: {err}") from None


def too_long_error(source: RecordSource, record: dict, what: str, n: int,
                   max_len: int) -> DataError:
    """The error ``on_too_long='error'`` raises: ``file:line: <what> is n tokens, ...``."""
    return DataError(f"{source.path}:{record['line']}: {what} is {n} tokens, more than "
                     f"data.max_len={max_len} (data.on_too_long='error'; 'truncate' cuts it)")


class SFTBatches(RowBatches):
    """Demonstrations as :class:`TokenBatch` rows ``[B/P, max_len]``.

    A row is ``prompt + response + EOS``, loss on response and EOS, padded with
    ``pad_id``; EOS is the tokenizer's ``eos_id`` (a chat template's end-of-turn after a
    rendered conversation prompt and its reply). Too long: ``on_too_long='error'`` raises
    naming file and line; ``'truncate'`` applies :func:`rlhf_jax.data.rows.fit_example` (prompt tail, response
    head) and counts it in ``num_truncated``. ``packing``: first-fit in file order, each
    example its own segment. Packed rows are fixed once, then shuffled per epoch.
    """

    def __init__(self, path: str, tokenizer: TextTokenizer, cfg: DataConfig, *, seed: int,
                 cache_dir: str, process_index: int = 0, process_count: int = 1):
        source = open_store(path, "demonstrations", cache_dir)
        self.tokenizer = tokenizer
        self.max_len = cfg.max_len
        self.num_truncated = 0
        lengths = []
        self._ids = []  # per record: (prompt ids, response ids)
        for record in source:
            ids = (record_prompt_ids(source, record, tokenizer), encode_ids(tokenizer, record["response"]))
            self._ids.append(ids)
            n = len(ids[0]) + len(ids[1]) + 1
            if n > cfg.max_len:
                if cfg.on_too_long == "error":
                    raise too_long_error(source, record, "prompt + response + EOS", n, cfg.max_len)
                self.num_truncated += 1
            lengths.append(min(n, cfg.max_len))
        rows = (first_fit(lengths, cfg.max_len) if cfg.packing
                else [[i] for i in range(len(lengths))])
        super().__init__(source, [tuple(r) for r in rows], batch_size=cfg.batch_size, seed=seed,
                         shuffle=cfg.shuffle, process_index=process_index,
                         process_count=process_count)

    def _assemble(self, row: tuple[int, ...]) -> dict[str, np.ndarray]:
        eos = self.tokenizer.eos_id
        pieces = []
        for index in row:
            prompt, response = self._ids[index]
            tokens, n_prompt, _ = fit_example(prompt.tolist(), response.tolist(), eos, self.max_len)
            pieces.append(example_piece(tokens, n_prompt))
        return pack_row(pieces, self.max_len, self.tokenizer.pad_id)


class TextBatches(RowBatches):
    """Pretraining text as language-model :class:`TokenBatch` rows ``[B/P, max_len]``.

    Each text is ``tokens + EOS`` (the tokenizer's ``text_eos_id``, not a chat template's
    end-of-turn), split by :func:`rlhf_jax.data.rows.text_chunks` into
    pieces of at most ``max_len`` (nothing is truncated); loss on every token but a
    piece's first. Without ``packing`` each piece is a row; with it, first-fit.
    """

    def __init__(self, path: str, tokenizer: TextTokenizer, cfg: DataConfig, *, seed: int,
                 cache_dir: str, process_index: int = 0, process_count: int = 1):
        source = open_store(path, "text", cache_dir)
        self.tokenizer = tokenizer
        self.max_len = cfg.max_len
        pieces, lengths = [], []
        self._ids = [encode_ids(tokenizer, record["text"]) for record in source]  # per record
        for index, ids in enumerate(self._ids):
            chunks = text_chunks(ids.tolist(), tokenizer.text_eos_id, cfg.max_len)
            for c, (tokens, _) in enumerate(chunks):
                pieces.append((index, c))
                lengths.append(len(tokens))
        groups = (first_fit(lengths, cfg.max_len) if cfg.packing
                  else [[i] for i in range(len(pieces))])
        rows = [tuple(pieces[i] for i in group) for group in groups]
        super().__init__(source, rows, batch_size=cfg.batch_size, seed=seed, shuffle=cfg.shuffle,
                         process_index=process_index, process_count=process_count)

    def _assemble(self, row: tuple[tuple[int, int], ...]) -> dict[str, np.ndarray]:
        chunks = {index: text_chunks(self._ids[index].tolist(), self.tokenizer.text_eos_id, self.max_len)
                  for index in sorted({index for index, _ in row})}
        pieces = [chunks[index][c] for index, c in row]
        return pack_row(pieces, self.max_len, self.tokenizer.pad_id)


def to_global(batch: TokenBatch | RankingBatch, mesh: Mesh) -> TokenBatch | RankingBatch:
    """Process-local numpy batch -> global ``jax.Array`` batch split over (data, fsdp).

    Each process passes its own ``B/P`` rows (from ``get``); the global leading dim is B.
    """
    if jax.process_count() == 1:  # one transfer call for the whole batch: half the host time
        return jax.device_put(batch, jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), batch))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x),
        batch)
