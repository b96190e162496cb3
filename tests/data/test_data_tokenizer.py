"""Local HF tokenizer loading: ids, EOS, pad fallback, clear errors."""

import pytest
from data_testlib import EOS, PAD, save_tokenizer

from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.tokenizer import load_tokenizer


def test_encode_adds_no_special_tokens(tok):
    # "w1" is id 4; "zz" is not in the vocabulary -> <unk> (2). No EOS appended.
    assert tok.encode("w1 w2  w3 zz") == [4, 5, 6, 2]
    assert (tok.eos_id, tok.pad_id) == (EOS, PAD)
    assert tok.decode([4, 5, EOS]) == "w1 w2"  # specials skipped
    assert tok.vocab_size == 103


def test_pad_falls_back_to_eos(tmp_path):
    tok = load_tokenizer(save_tokenizer(tmp_path / "nopad", with_pad=False))
    assert tok.pad_id == tok.eos_id == EOS


def test_missing_or_unusable_directory(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="broken: not a usable Hugging Face tokenizer directory"):
        load_tokenizer(tmp_path / "broken")
