"""Tokenizers as the data pipeline sees them: ``encode``, ``eos_id``, ``pad_id``.

Loaders accept anything with that shape (:class:`TextTokenizer`): the embedded task's
tokenizer, or a Hugging Face tokenizer from a local directory wrapped in
:class:`HFTokenizer`. Nothing is ever downloaded.
"""

from __future__ import annotations

import pathlib
from typing import Protocol, Sequence

import numpy as np

from rlhf_jax.data.jsonl import DataError


class TextTokenizer(Protocol):
    """What the loaders need. ``encode`` adds no special tokens (loaders add EOS)."""

    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


def encode_ids(tokenizer: TextTokenizer, text: str) -> np.ndarray:
    """``text``'s token ids as an int32 array (the loaders keep them: 4 bytes a token)."""
    return np.asarray(tokenizer.encode(text), np.int32)


class HFTokenizer:
    """A ``transformers`` tokenizer seen through :class:`TextTokenizer`.

    ``pad_id`` falls back to ``eos_id`` when the tokenizer has no pad token (GPT-2 and
    Llama have none); padding is always masked out, so reusing EOS is harmless.
    """

    def __init__(self, hf_tokenizer, source: str = "<tokenizer>"):
        if hf_tokenizer.eos_token_id is None:
            raise DataError(f"{source}: the tokenizer has no EOS token; "
                            "responses must end with one")
        self.hf = hf_tokenizer
        self.eos_id: int = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id: int = self.eos_id if pad is None else int(pad)
        self.vocab_size: int = len(hf_tokenizer)  # includes added tokens, unlike .vocab_size

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | pathlib.Path) -> HFTokenizer:
    """Loads a HF tokenizer from a local directory; never touches the network or runs its code."""
    from transformers import AutoTokenizer  # slow import, only needed for HF tokenizers

    path = pathlib.Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer path {path}: no such directory")
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                           trust_remote_code=False)
    except Exception as err:  # transformers and tokenizers raise many types for a bad directory
        raise DataError(f"tokenizer path {path}: not a usable Hugging Face tokenizer "
                        f"directory ({type(err).__name__}: {err})") from err
    return HFTokenizer(hf, source=str(path))
