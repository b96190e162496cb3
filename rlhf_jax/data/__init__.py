"""Data: JSONL readers, TFDS array_record stores, tokenisers and grain-fed batch loaders.

JSONL files are validated (:mod:`.jsonl`), stored once as TFDS array_record datasets
(:mod:`.tfds_store`) and served as deterministic process-local batches
(:mod:`.loader`, :mod:`.ranking`, :mod:`.prompts`) that :func:`to_global` turns into
sharded global arrays. A prompt is text or a conversation (:mod:`.chat`), rendered by the
tokenizer's chat template (:mod:`.tokenizer`); :mod:`.public` converts the public preference
and demonstration sets into these files (``rlhf-jax data convert``, :mod:`.cli`).
"""

from rlhf_jax.data.jsonl import DataError, iter_records, read_records
from rlhf_jax.data.loader import RowBatches, SFTBatches, TextBatches, to_global
from rlhf_jax.data.prompts import PromptBatches
from rlhf_jax.data.ranking import RankingBatches
from rlhf_jax.data.tfds_store import RecordSource, build_store, open_store
from rlhf_jax.data.tokenizer import HFTokenizer, TextTokenizer, load_tokenizer

__all__ = [
    "DataError", "iter_records", "read_records",
    "RowBatches", "SFTBatches", "TextBatches", "RankingBatches", "PromptBatches", "to_global",
    "RecordSource", "build_store", "open_store",
    "HFTokenizer", "TextTokenizer", "load_tokenizer",
]
