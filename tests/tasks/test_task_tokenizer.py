"""The task tokenizer: exact round trips, no <unk>, loads through AutoTokenizer offline."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from rlhf_jax.tasks import corpus, tokenizer as T, vocab as V
from rlhf_jax.tasks.internet import sample_responses
from rlhf_jax.tasks.prompts import generate_prompt


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = T.save_tokenizer(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _task_texts():
    splits = corpus.make_splits(seed=0, n_demonstrations=300, n_demonstrations_val=50,
                                n_prompts=300, n_prompts_val=50, n_pretrain=1000,
                                n_pretrain_val=50)
    for name, records in splits.items():
        for r in records:
            yield from r.values()
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt = generate_prompt(rng)
        yield from sample_responses(prompt, 4, rng)


def test_special_tokens_and_size(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "<eos>")
    assert len(tok) == V.VOCAB_SIZE == 163
    assert tok.convert_ids_to_tokens(list(range(V.VOCAB_SIZE))) == list(V.VOCAB)


def test_round_trip_and_no_unk_on_task_text(tok):
    texts = [t for t in _task_texts() if t]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert len(ids) == len(text.split())  # one token per word
        assert tok.decode(ids) == text
    assert len(texts) > 2000


def test_prompt_then_response_tokens_equal_joined_text(tok):
    # The data pipeline encodes prompt and response separately and concatenates.
    prompt, response = "sort from high to low : 3 12 5 =>", "12 5 3"
    joined = tok.encode(f"{prompt} {response}", add_special_tokens=False)
    parts = tok.encode(prompt, add_special_tokens=False) + tok.encode(response, add_special_tokens=False)
    assert joined == parts
    assert tok.decode(parts + [tok.eos_token_id, 0, 0], skip_special_tokens=True) == f"{prompt} {response}"


def test_encoding_adds_no_special_tokens_and_maps_unknowns(tok):
    assert tok("reverse : a b =>")["input_ids"] == tok.encode("reverse : a b =>", add_special_tokens=False)
    assert tok.encode("reverse zebra", add_special_tokens=False)[-1] == tok.unk_token_id
    batch = tok(["a b c", "a"], padding=True)["input_ids"]
    assert batch[1][1:] == [0, 0]  # right padding with <pad> = 0


def test_in_memory_tokenizer_matches_saved(tok):
    built = T.build_tokenizer()
    text = "ugh , politely keep the first 2 of : a b c , in brackets => ( a b ) thanks"
    assert built.encode(text) == tok.encode(text)
