"""A real HuggingFace tokenizer for the task's closed vocabulary.

Word-level (one id per word type, split on whitespace), so every task string round-trips
exactly and a tiny model spends no capacity on sub-word spelling. It is saved with
``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained(dir,
local_files_only=True)``, the same call a researcher's HF checkpoint goes through.

Special tokens: ``<pad>`` (id 0), ``<eos>`` (1), ``<unk>`` (2), ``<bos>`` (3). Encoding adds
none of them (no post-processor): the data pipeline decides where ``<eos>`` goes.
Decoding joins words with single spaces; ``skip_special_tokens=True`` drops the specials.
"""

from __future__ import annotations

import pathlib

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.tasks import vocab as V
from rlhf_jax.tasks.internet import MAX_FLAWED_RESPONSE_TOKENS
from rlhf_jax.tasks.prompts import MAX_PROMPT_TOKENS

# Long enough for any prompt + (flawed) response + <eos>, with room for packing two such texts.
MODEL_MAX_LENGTH = 2 * (MAX_PROMPT_TOKENS + MAX_FLAWED_RESPONSE_TOKENS + 1)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task tokenizer, built in memory from :data:`rlhf_jax.tasks.vocab.VOCAB`."""
    word_level = models.WordLevel(vocab={w: i for i, w in enumerate(V.VOCAB)},
                                  unk_token=V.UNK)
    backend = Tokenizer(word_level)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the backend then joins tokens with one space, the inverse of
    # WhitespaceSplit on normalised text.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=V.PAD, eos_token=V.EOS, unk_token=V.UNK, bos_token=V.BOS,
        # The default clean-up would glue " ," and " ." to the previous word and break the
        # round trip of task text.
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )


def save_tokenizer(out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes the task tokenizer to ``out_dir`` (``save_pretrained`` layout)."""
    out_dir = pathlib.Path(out_dir)
    build_tokenizer().save_pretrained(str(out_dir))
    return out_dir
