"""``rlhf-jax data convert`` around the formats: inputs, splits, --out safety, determinism,
and converted records tokenised into training rows (the mistakes a converter makes show
there: a prompt space on the wrong side, a mask off by one, a doubled EOS)."""

import json

import numpy as np
import pytest
from data_testlib import data_cfg, save_bpe_tokenizer, save_chat_tokenizer
from public_testlib import HH_PROMPT, HH_TWO_TURNS, QUERY, TREE, read_out, run, write_lines

from rlhf_jax.cli import main as cli_main
from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.loader import SFTBatches
from rlhf_jax.data.ranking import RankingBatches
from rlhf_jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return load_tokenizer(save_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


def test_inputs_splits_and_json_arrays(tmp_path):
    hh = tmp_path / "hh"
    write_lines(hh / "harmless-base" / "train.jsonl.gz", [HH_TWO_TURNS])
    write_lines(hh / "helpful-base" / "test.jsonl", [HH_TWO_TURNS])
    (hh / "helpful-base" / "README.md").write_text("not data")  # skipped: not a data file
    (hh / "extra.json").write_text(json.dumps([HH_TWO_TURNS]))  # one JSON array: split from no name -> train
    out, summary = run("hh-rlhf", [hh], tmp_path / "out")
    assert summary["read"] == 3 and summary["dropped"] == {"duplicate": 1}  # the array repeats the train record
    assert set(out) == {"train", "test"}
    out, _ = run("hh-rlhf", [hh], tmp_path / "one", split="all")
    assert list(out) == ["all"]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no data files in this directory"):
        run("hh-rlhf", [tmp_path / "empty_dir"], tmp_path / "x")
    with pytest.raises(DataError, match=r"nothing to write from 1 records as hh-rlhf: chosen == rejected \(1\)"):
        run("hh-rlhf", [write_lines(tmp_path / "same.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                                "rejected": "\n\nHuman: a\n\nAssistant: b"}])],
            tmp_path / "none")


def test_out_is_never_overwritten_without_the_flag(tmp_path, capsys):
    path = write_lines(tmp_path / "train.jsonl", [HH_TWO_TURNS])
    out = tmp_path / "out"
    argv = ["data", "convert", "--format", "hh-rlhf", "--out", str(out), str(path)]
    assert cli_main(argv) == 0
    assert "train: 1 comparisons, 1 prompts" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    (out / "train" / "comparisons.jsonl").write_text("stale\n")
    assert cli_main(argv) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "train" / "comparisons.jsonl").read_text() == "stale\n"
    assert cli_main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # not one of its files: left alone
    assert read_out(out)["train"]["comparisons"][0]["prompt"] == HH_PROMPT


def test_same_inputs_same_bytes(tmp_path):
    path = write_lines(tmp_path / "trees.jsonl", [TREE])
    run("oasst1", [path], tmp_path / "a")
    run("oasst1", [path], tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4  # train/{comparisons,demonstrations,prompts}.jsonl + convert.json
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def apart_equals_together(tok, prompt: str, response: str) -> bool:
    return tok.encode(prompt) + tok.encode(response) == tok.encode(prompt + response)


def test_tldr_prompt_space_goes_with_the_summary(tmp_path, bpe):
    # CarperAI's layout ends the prompt with "TL;DR: ": tokenised apart, that space would be a
    # lone token and "my" would lose the space it has in running text
    record = {"prompt": QUERY + " ", "label": "my friend cancels plans"}
    assert not apart_equals_together(bpe, record["prompt"], record["label"])
    path = write_lines(tmp_path / "train.jsonl", [record])
    (demo,) = run("tldr", [path], tmp_path / "out")[0]["train"]["demonstrations"]
    assert demo == {"prompt": QUERY, "response": " my friend cancels plans"}
    assert apart_equals_together(bpe, demo["prompt"], demo["response"])


def test_converted_hh_rows_mask_from_the_first_reply_token_and_one_eos(tmp_path, bpe, cache_dir):
    path = write_lines(tmp_path / "train.jsonl", [HH_TWO_TURNS])
    run("hh-rlhf", [path], tmp_path / "out", chosen_as_demonstrations=True)
    prompt_ids, reply_ids = bpe.encode(HH_PROMPT), bpe.encode(" I think a mammal.")
    assert prompt_ids + reply_ids == bpe.encode(HH_TWO_TURNS["chosen"])  # the cut falls between tokens
    row = SFTBatches(str(tmp_path / "out" / "train" / "demonstrations.jsonl"), bpe, data_cfg(batch_size=1, max_len=64),
                     seed=0, cache_dir=cache_dir).get(0)
    n, m = len(prompt_ids), len(reply_ids)
    np.testing.assert_array_equal(row.tokens[0, :n + m + 1], prompt_ids + reply_ids + [bpe.eos_id])
    assert int(np.sum(row.tokens[0] == bpe.eos_id)) == 1 + (64 - n - m - 1)  # one EOS, then EOS-valued padding
    np.testing.assert_array_equal(row.loss_mask[0, :n + m + 2], [0] * n + [1] * (m + 1) + [0])
    ranking = RankingBatches(str(tmp_path / "out" / "train" / "comparisons.jsonl"), bpe,
                             data_cfg(batch_size=1, max_len=64), seed=0, cache_dir=cache_dir, k_max=2).get(0)
    assert ranking.tokens[0, 0, ranking.last_index[0, 0]] == bpe.eos_id  # the reward is read at the EOS


def test_task_conversations_round_trip_through_trl_and_a_chat_template(tmp_path, cache_dir, capsys):
    from rlhf_jax.tasks import make_splits

    assert cli_main(["data", "task-conversations", "--out", str(tmp_path / "task"), "--n-demonstrations", "6",
                     "--n-demonstrations-val", "2", "--n-prompts", "8", "--n-prompts-val", "3",
                     "--n-comparisons", "8", "--n-comparisons-val", "3"]) == 0
    first = json.loads((tmp_path / "task" / "train_prefs.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected"} and first["chosen"][0]["role"] == "assistant"
    out, summary = run("trl", [tmp_path / "task"], tmp_path / "conv")
    splits = make_splits(n_demonstrations=6, n_demonstrations_val=2, n_prompts=8, n_prompts_val=3, n_pretrain=0,
                         n_pretrain_val=0)
    assert [(d["prompt"][0]["content"], d["response"]) for d in out["val"]["demonstrations"]] == \
        [(d["prompt"], d["response"]) for d in splits["demonstrations_val"]]
    assert 1 <= summary["written"]["train"]["comparisons"] <= 8  # ties have no TRL form and are left out
    # prompts.jsonl: every distinct prompt of the split (PPO's, the comparisons', the demonstrations')
    val_prompts = [p["prompt"][0]["content"] for p in out["val"]["prompts"]]
    assert sorted(val_prompts) == sorted({r["prompt"] for name in ("prompts_val", "demonstrations_val")
                                          for r in splits[name]})
    # the converted demonstrations through SmolLM2's template: reply + <|im_end|>, loss on exactly those
    chatml = load_tokenizer(save_chat_tokenizer(tmp_path / "chatml", "chatml"))
    demo = out["train"]["demonstrations"][0]
    row = SFTBatches(str(tmp_path / "conv" / "train" / "demonstrations.jsonl"), chatml,
                     data_cfg(batch_size=1, max_len=64), seed=0, cache_dir=cache_dir).get(0)
    n = len(chatml.encode_prompt(demo["prompt"]))
    reply = chatml.encode(demo["response"]) + [2]
    np.testing.assert_array_equal(row.tokens[0, n:n + len(reply)], reply)
    assert row.loss_mask[0].sum() == len(reply) and row.loss_mask[0, n] == 1 and row.loss_mask[0, n - 1] == 0
