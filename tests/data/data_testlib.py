"""Helpers shared by the data tests (imported as ``data_testlib``; a unique module name,
since test directories have no ``__init__.py``).

The test tokenizer's vocabulary: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then ``w0``..``w99``
as 3..102, so ``"w1 w2"`` encodes to ``[4, 5]`` and expected rows can be written by hand.
"""

import pathlib

from rlhf_jax.config import DataConfig

PAD, EOS, UNK = 0, 1, 2


def word_ids(text: str) -> list[int]:
    """The test tokenizer's encoding of ``"w3 w7"``-style text: ``[6, 10]``."""
    return [int(w[1:]) + 3 for w in text.split()]


def words(start: int, n: int) -> str:
    """``n`` consecutive words from ``w<start>``: ``words(5, 3) == "w5 w6 w7"``."""
    return " ".join(f"w{i}" for i in range(start, start + n))


def save_tokenizer(out_dir: pathlib.Path, with_pad: bool) -> pathlib.Path:
    """Writes the word-level test tokenizer (``save_pretrained`` layout) to ``out_dir``."""
    # Imported here: transformers pulls in torch, seconds the multiprocess worker should not pay.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"w{i}": i + 3 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"eos_token": "<eos>", "unk_token": "<unk>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(str(out_dir))
    return out_dir


def data_cfg(**overrides) -> DataConfig:
    """A DataConfig for tests: batch 4, rows of 16, no shuffling unless asked."""
    base = dict(train_path="unused", val_path=None, batch_size=4, max_len=16, shuffle=False)
    return DataConfig(**{**base, **overrides})
