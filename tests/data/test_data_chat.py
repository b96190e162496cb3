"""Conversation prompts through the chat template: token-exact rows, masks, the stop token.

The chat tokenizers are word-level (data_testlib.save_chat_tokenizer), so every expected row
is written out by hand. ChatML (SmolLM2's template, EOS = <|im_end|>) ids: <|im_start|> 1,
<|im_end|> 2, system 3, user 4, assistant 5, w<i> 7+i. Llama 3 style ids: <|begin_of_text|> 0,
<|end_of_text|> 1, <|start_header_id|> 2, <|end_header_id|> 3, <|eot_id|> 4, system 5,
user 6, assistant 7, w<i> 9+i; its tokenizer adds BOS when asked for special tokens.
"""

import json

import numpy as np
import pytest
from data_testlib import EOS, data_cfg, save_chat_tokenizer, word_ids

from rlhf_jax.data.jsonl import DataError, read_records
from rlhf_jax.data.loader import SFTBatches, TextBatches
from rlhf_jax.data.prompts import PromptBatches
from rlhf_jax.data.ranking import RankingBatches
from rlhf_jax.data.tokenizer import HFTokenizer, load_tokenizer

CONVERSATION = [{"role": "system", "content": "w0"}, {"role": "user", "content": "w1 w2"}]
# <|im_start|>system\nw0<|im_end|>\n<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n
CHATML_PROMPT = [1, 3, 7, 2, 1, 4, 8, 9, 2, 1, 5]
# <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nw0<|eot_id|>...assistant<|end_header_id|>\n\n
LLAMA3_PROMPT = [0, 2, 5, 3, 9, 4, 2, 6, 3, 10, 11, 4, 2, 7, 3]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return save_chat_tokenizer(tmp_path_factory.mktemp("chatml"), "chatml")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return save_chat_tokenizer(tmp_path_factory.mktemp("llama3"), "llama3")


def sft_row(path, tok, cache_dir, **cfg):
    batch = SFTBatches(str(path), tok, data_cfg(batch_size=1, max_len=24, **cfg), seed=0, cache_dir=cache_dir)
    return batch.get(0)


def test_chatml_demonstration_row_is_token_exact(write_jsonl, cache_dir, chatml_dir):
    tok = load_tokenizer(chatml_dir)
    assert tok.uses_chat_template and tok.eos_id == tok.text_eos_id == 2  # <|im_end|> ends turn and text
    path = write_jsonl("d.jsonl", [{"prompt": CONVERSATION, "response": "w3 w4"}])
    row = sft_row(path, tok, cache_dir)
    want = CHATML_PROMPT + [10, 11, 2]  # the reply, then ONE <|im_end|>
    np.testing.assert_array_equal(row.tokens[0, :len(want)], want)
    np.testing.assert_array_equal(row.tokens[0, len(want):], 2)  # pad = <|im_end|>, masked
    # loss from the first response token (index 11 = len(prompt)) through <|im_end|>, nothing else
    np.testing.assert_array_equal(row.loss_mask[0], [0] * 11 + [1, 1, 1] + [0] * 10)
    np.testing.assert_array_equal(row.segment_ids[0], [1] * 14 + [0] * 10)


def test_llama3_one_bos_and_the_turn_ends_with_eot_not_eos(write_jsonl, cache_dir, llama3_dir):
    tok = load_tokenizer(llama3_dir)
    assert (tok.eos_id, tok.text_eos_id) == (4, 1)  # <|eot_id|> stops a reply; <|end_of_text|> ends a text
    assert tok.hf.encode("w1", add_special_tokens=True) == [0, 10]  # this tokenizer would add a BOS
    path = write_jsonl("d.jsonl", [{"prompt": CONVERSATION, "response": "w3 w4"}])
    row = sft_row(path, tok, cache_dir)
    want = LLAMA3_PROMPT + [12, 13, 4]
    np.testing.assert_array_equal(row.tokens[0, :len(want)], want)
    assert int(np.sum(row.tokens[0] == 0)) == 1  # a single BOS, written by the template
    np.testing.assert_array_equal(row.loss_mask[0, :len(want)], [0] * 15 + [1, 1, 1])


def test_ranking_and_prompt_rows_use_the_template_and_stop_token(write_jsonl, cache_dir, llama3_dir):
    tok = load_tokenizer(llama3_dir)
    path = write_jsonl("c.jsonl", [{"prompt": CONVERSATION, "responses": ["w3", "w4 w5"], "ranks": [1, 0]}])
    batch = RankingBatches(str(path), tok, data_cfg(batch_size=1, max_len=24), seed=0, cache_dir=cache_dir,
                           k_max=2).get(0)
    np.testing.assert_array_equal(batch.tokens[0, 0, :17], LLAMA3_PROMPT + [12, 4])
    np.testing.assert_array_equal(batch.tokens[0, 1, :18], LLAMA3_PROMPT + [13, 14, 4])
    np.testing.assert_array_equal(batch.last_index[0], [16, 17])  # the reward is read at <|eot_id|>
    prompts = write_jsonl("p.jsonl", [{"prompt": CONVERSATION}])
    batches = PromptBatches(str(prompts), tok, data_cfg(batch_size=1, max_len=20), seed=0, cache_dir=cache_dir)
    row = batches.get(0)
    np.testing.assert_array_equal(row.tokens[0, 5:], LLAMA3_PROMPT)  # left-padded: ends at the reply's start
    assert batches.prompts == [CONVERSATION]
    assert tok.decode_prompt(row.tokens[0, 5:]) == CONVERSATION  # what the row was rendered from


def test_default_system_message_of_smollm2_template(chatml_dir):
    # With no system message the template writes SmolLM2's own; its words are <unk> (6) here
    # but for "assistant" (5): "You are a helpful AI assistant named SmolLM, trained by Hugging Face".
    ids = load_tokenizer(chatml_dir).encode_prompt([{"role": "user", "content": "w1"}])
    assert ids == [1, 3, *[6] * 5, 5, *[6] * 6, 2, 1, 4, 8, 2, 1, 5]


def test_text_prompt_is_encoded_as_it_stands(write_jsonl, cache_dir, chatml_dir, llama3_dir, tok):
    path = write_jsonl("d.jsonl", [{"prompt": "w1 w2", "response": "w3"}])
    # ChatML: no template around text, the reply ends with <|im_end|> (also its EOS)
    row = sft_row(path, load_tokenizer(chatml_dir), cache_dir)
    np.testing.assert_array_equal(row.tokens[0, :4], [8, 9, 10, 2])
    # chat_template="none": exactly the plain pipeline, the reply ends with the tokenizer's EOS
    plain = load_tokenizer(llama3_dir, chat_template="none")
    assert not plain.uses_chat_template and plain.eos_id == plain.text_eos_id == 1
    row = sft_row(path, plain, cache_dir)
    np.testing.assert_array_equal(row.tokens[0, :4], [10, 11, 12, 1])
    np.testing.assert_array_equal(row.loss_mask[0, :4], [0, 0, 1, 1])
    # a tokenizer without a template (the embedded task's kind) is unchanged by "auto"
    assert not tok.uses_chat_template and tok.eos_id == tok.text_eos_id == EOS
    row = sft_row(path, tok, cache_dir)
    np.testing.assert_array_equal(row.tokens[0, :4], word_ids("w1 w2 w3") + [EOS])


def test_pretraining_text_ends_with_eos_not_end_of_turn(write_jsonl, cache_dir, llama3_dir):
    tok = load_tokenizer(llama3_dir)
    path = write_jsonl("t.jsonl", [{"text": "w1 w2"}])
    row = TextBatches(str(path), tok, data_cfg(batch_size=1, max_len=8), seed=0, cache_dir=cache_dir).get(0)
    np.testing.assert_array_equal(row.tokens[0, :3], [10, 11, 1])


def test_conversation_needs_a_template(write_jsonl, cache_dir, tok, llama3_dir):
    path = write_jsonl("d.jsonl", [{"prompt": "w1", "response": "w2"}, {"prompt": CONVERSATION, "response": "w3"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*needs a chat template.*has no chat template"):
        SFTBatches(str(path), tok, data_cfg(), seed=0, cache_dir=cache_dir)
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*chat_template='none'"):
        SFTBatches(str(path), load_tokenizer(llama3_dir, "none"), data_cfg(), seed=0, cache_dir=cache_dir)


def test_template_errors_are_data_errors(write_jsonl, cache_dir, chatml_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chatml_dir), local_files_only=True)
    hf.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                        "{% endif %}{{ m['content'] + '<|im_end|>' }}{% endfor %}")
    path = write_jsonl("d.jsonl", [{"prompt": CONVERSATION, "response": "w3"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the chat template of .* refused the conversation.*no system"):
        SFTBatches(str(path), HFTokenizer(hf, "tok"), data_cfg(), seed=0, cache_dir=cache_dir)
    hf.chat_template = "{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}"  # no end-of-turn token
    with pytest.raises(DataError, match=r"tok: its chat template ends an assistant reply with '\\n'"):
        HFTokenizer(hf, "tok")
    assert HFTokenizer(hf, "tok", chat_template="none").eos_id == 2  # usable without the template


@pytest.mark.parametrize("prompt, error", [
    ([], r'field "prompt" must be a string or a non-empty list of messages'),
    ([{"role": "user"}], r'field "prompt"\[0\] "content" must be a string, got NoneType'),
    ([{"role": "tool", "content": "x"}], r"""field "prompt"\[0\] has role 'tool'"""),
    (["hi"], r'field "prompt"\[0\] must be an object'),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     r"""field "prompt" ends with a 'assistant' message"""),
])
def test_bad_conversations_name_file_and_line(write_jsonl, prompt, error):
    path = write_jsonl("p.jsonl", [{"prompt": "ok"}, {"prompt": prompt}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: " + error):
        read_records(path, "prompts")


def test_global_rows_are_the_rows_each_batch_holds(write_jsonl, cache_dir, tok):
    records = [{"prompt": f"w{i}"} for i in range(10)]
    path = write_jsonl("p.jsonl", records)
    cfg = data_cfg(batch_size=4, max_len=4, shuffle=True)
    for process in range(2):
        batches = PromptBatches(str(path), tok, cfg, seed=3, cache_dir=cache_dir, process_index=process,
                                process_count=2)
        for step in (0, 1, 2, 5):  # two full batches an epoch: steps 2 and 5 are later epochs
            local = batches.get(step).tokens[:, -1]  # each prompt is one word: its id
            mine = batches.global_prompts(step)[2 * process: 2 * process + 2]
            assert [tok.decode([t]) for t in local] == mine
    assert json.dumps(batches.global_prompts(0)) != json.dumps(batches.global_prompts(2))  # reshuffled
