"""write_task_files: fields, determinism, idempotence, honest held-out splits."""

import json

import pytest

from rlhf_jax import tasks
from rlhf_jax.data import load_tokenizer
from rlhf_jax.tasks.prompts import parse, solve


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

SMALL = dict(n_demonstrations=300, n_demonstrations_val=40, n_prompts=300, n_prompts_val=40, n_prompts_heldout=30,
             n_pretrain=2000, n_pretrain_val=100)
FIELDS = {"demonstrations": {"prompt", "response"}, "demonstrations_val": {"prompt", "response"},
          "prompts": {"prompt"}, "prompts_val": {"prompt"}, "prompts_heldout": {"prompt"}, "pretrain": {"text"},
          "pretrain_val": {"text"}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    return tasks.write_task_files(out, seed=0, **SMALL)


def test_files_have_documented_fields_and_sizes(written):
    assert set(FIELDS) | {"tokenizer", "manifest"} <= set(written)
    for name, fields in FIELDS.items():
        lines = written[name].read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == SMALL[f"n_{name}"]
        for r in records:
            assert set(r) == fields
            assert all(isinstance(v, str) for v in r.values())
            if "prompt" in r:
                assert r["prompt"].endswith(" =>")
                parse(r["prompt"])
    assert (written["tokenizer"] / "tokenizer.json").is_file()
    tok = load_tokenizer(written["tokenizer"])  # the loader every stage uses
    assert tok.vocab_size == tasks.VOCAB_SIZE
    manifest = json.loads(written["manifest"].read_text())
    assert manifest["vocab_size"] == tasks.VOCAB_SIZE
    assert manifest["max_prompt_tokens"] == tasks.MAX_PROMPT_TOKENS
    assert manifest["max_response_tokens"] == tasks.MAX_RESPONSE_TOKENS
    assert manifest["settings"]["seed"] == 0


def test_lengths_within_documented_bounds(written):
    for name in ("demonstrations", "demonstrations_val"):
        for r in _records(written[name]):
            assert len(r["prompt"].split()) <= tasks.MAX_PROMPT_TOKENS
            assert len(r["response"].split()) <= tasks.MAX_RESPONSE_TOKENS
    for name in ("pretrain", "pretrain_val"):
        for r in _records(written[name]):
            assert 1 <= len(r["text"].split()) <= tasks.MAX_TEXT_TOKENS


def test_deterministic_and_idempotent(written, tmp_path):
    again = tasks.write_task_files(tmp_path / "again", seed=0, **SMALL)
    for name in FIELDS:
        assert again[name].read_bytes() == written[name].read_bytes()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (again["tokenizer"] / f).read_bytes() == (written["tokenizer"] / f).read_bytes()
    # Same settings: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.joinpath("again").rglob("*")}
    assert tasks.write_task_files(tmp_path / "again", seed=0, **SMALL) == again
    assert {p: p.stat().st_mtime_ns for p in tmp_path.joinpath("again").rglob("*")} == stamps
    # Other settings: regenerated in place.
    other = tasks.write_task_files(tmp_path / "again", seed=1, **SMALL)
    assert other["prompts"].read_bytes() != written["prompts"].read_bytes()
    assert json.loads(other["manifest"].read_text())["settings"]["seed"] == 1


def test_incomplete_directory_is_rewritten(written, tmp_path):
    paths = tasks.write_task_files(tmp_path, seed=0, **SMALL)
    paths["prompts"].unlink()
    tasks.write_task_files(tmp_path, seed=0, **SMALL)
    assert paths["prompts"].read_bytes() == written["prompts"].read_bytes()


def test_held_out_problems_appear_in_no_training_split(written):
    def problems(name, field="prompt"):
        return {parse(r[field]).problem for r in _records(written[name])}

    held_out = problems("prompts_val") | problems("demonstrations_val") | problems("prompts_heldout")
    train = problems("demonstrations") | problems("prompts")
    assert len(problems("prompts_val")) == SMALL["n_prompts_val"]  # distinct problems
    assert not held_out & train
    assert not problems("demonstrations") & problems("prompts")
    assert not problems("prompts_val") & problems("demonstrations_val")
    pretrain_pairs = {parse(r["text"].split("=>")[0] + "=>").problem
                      for n in ("pretrain", "pretrain_val")
                      for r in _records(written[n]) if "=>" in r["text"]}
    assert len(pretrain_pairs) > 500
    assert not held_out & pretrain_pairs
    # the held-out family: only in pretraining text and prompts_heldout
    trained = {p.family for p in train | problems("prompts_val") | problems("demonstrations_val")}
    assert trained.isdisjoint(tasks.HELD_OUT_FAMILIES)
    assert {p.family for p in problems("prompts_heldout")} == set(tasks.HELD_OUT_FAMILIES)
    assert {p.family for p in pretrain_pairs} >= set(tasks.HELD_OUT_FAMILIES)


def test_demonstrations_are_mostly_correct():
    splits = tasks.make_splits(seed=0, **{**SMALL, "n_demonstrations": 1000}, demo_noise=0.1)
    scores = [tasks.gold_score(r["prompt"], r["response"]) for r in splits["demonstrations"]]
    exact = sum(s == 1.0 for s in scores) / len(scores)
    assert 0.85 < exact < 0.95  # 10% get one edit, a few of which change nothing
    # labelers write for plain requests: no openers, and a constraint in about 1 of 100
    requests = [parse(r["prompt"]) for r in splits["demonstrations"]]
    assert not any(r.opener for r in requests)
    assert 0 < sum(r.constraint is not None for r in requests) < 0.05 * len(requests)
    clean = tasks.make_splits(seed=0, **SMALL, demo_noise=0.0)
    assert all(r["response"] == solve(r["prompt"]) for r in clean["demonstrations"])


def test_default_sizes():
    splits = tasks.make_splits(seed=0)
    sizes = {name: len(records) for name, records in splits.items()}
    assert sizes == {"prompts_val": 200, "demonstrations_val": 200, "prompts_heldout": 200, "demonstrations": 2000,
                     "prompts": 4000, "pretrain": 20000, "pretrain_val": 1000}


def test_family_subset_and_bad_settings():
    splits = tasks.make_splits(seed=0, **SMALL, families=("sort", "count", "last"))
    assert {tasks.family_of(r["prompt"]) for r in splits["prompts"]} == {"sort", "count"}
    with pytest.raises(ValueError, match="families"):
        tasks.make_splits(families=("translate",))
    with pytest.raises(ValueError, match="held_out_families"):
        tasks.make_splits(families=("last",))  # nothing left to train on
    assert tasks.make_splits(seed=0, **SMALL, held_out_families=())["prompts_heldout"] == []
    with pytest.raises(ValueError, match="demo_noise"):
        tasks.make_splits(demo_noise=1.5)


def test_demonstrations_are_valid_sft_data(tmp_path):
    """Noisy demonstrations still pass the SFT loader's validation (no empty responses)."""
    from rlhf_jax.data import read_records
    from rlhf_jax.tasks import write_task_files

    paths = write_task_files(tmp_path, seed=0, n_demonstrations=2000, n_pretrain=10, n_pretrain_val=10)
    assert len(read_records(paths["demonstrations"], "demonstrations")) == 2000
    read_records(paths["demonstrations_val"], "demonstrations")
