"""A changed run is never resumed or reused silently (issue 30, defects 3 to 5): a stage's
inputs are recorded with its checkpoints and its export (``rlhf_jax.provenance``) and a
rerun that changes any of them is refused, naming each; an export carries checksums, and a
damaged one is refused naming the file, then exported again by its stage.

One SFT run (4 steps, from an export) is trained once: ``stopped`` after 2 steps and
``finished``; each test changes one thing in a copy. ``docs/fault_tolerance.md`` lists them.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, parameters, provenance, sharding
from rlhf_jax.cli import main
from rlhf_jax.config import MeshConfig
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.stages import common
from rlhf_jax.stages.sft import run_sft
from tests.helpers import TINY_MODEL, tiny_config, tree_digest, write_demonstrations, write_marker_comparisons

MESH = MeshConfig(data=-1)


def _export_random(model, path: pathlib.Path, seed: int, extra=None) -> pathlib.Path:
    params, _ = parameters.create(model, sharding.make_mesh(MESH), jax.random.PRNGKey(seed))
    return checkpoint.export_params(path, params, TINY_MODEL, extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pathlib.Path:
    """``stopped`` (checkpoint at step 2 of 4) and ``finished`` SFT runs from the export
    ``init_a``; ``init_b`` another export of the same model; ``demos.jsonl`` their data."""
    root = tmp_path_factory.mktemp("changed")
    task = common.task_files(root / "task_source", 0)["manifest"].parent
    for name, seed in (("init_a", 1), ("init_b", 2)):
        _export_random(LanguageModel(TINY_MODEL), root / name, seed)
    cfg = tiny_config(write_demonstrations(root / "demos.jsonl", 32), steps=4, save_every=2)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, init_from=str(root / "init_a")))
    shutil.copytree(task, root / "stopped" / "data" / "task")
    assert run_sft(cfg, root / "stopped", show_progress=False, stop_after=2) is None
    shutil.copytree(root / "stopped", root / "finished")
    assert run_sft(cfg, root / "finished", show_progress=False) is not None  # a plain resume finishes
    return root


def _copy(runs: pathlib.Path, name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(runs / name, tmp_path / name))


def _stage_and_config(workdir: pathlib.Path) -> dict[str, str]:
    """What a refused command must leave as it was (the data cache may gain an entry, the
    run lock is taken first)."""
    return {k: v for k, v in tree_digest(workdir).items() if not k.startswith("data/cache") and k != ".lock"}


def _permute_two_tokens(workdir: pathlib.Path) -> None:
    path = workdir / "data" / "task" / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    path.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("change, named", [
    ("--sft.optim.learning_rate=0.01", "sft.optim.learning_rate: saved 0.003, this run 0.01"),
    ("--sft.max_steps=1", "sft.max_steps: saved 4, this run 1"),  # before: "stopped early" at every rerun, exit 0
    ("--sft.init_from=INIT_B", "sft.init_from: saved INIT_A ("),
    ("edit the data", "sft.data.train_path: the content of DEMOS changed (SHA-256 "),
    ("permute the tokenizer", "tokenizer: the content of TOKENIZER changed (SHA-256 "),
])
def test_a_resume_with_changed_inputs_is_refused_naming_each(runs, tmp_path, capsys, change, named):
    workdir = _copy(runs, "stopped", tmp_path)
    demos = runs / "demos.jsonl"
    original = demos.read_bytes()
    named = (named.replace("INIT_A", str(runs / "init_a")).replace("DEMOS", str(demos))
             .replace("TOKENIZER", "run:data/task/tokenizer"))
    argv = ["sft", "--workdir", str(workdir)]
    if change.startswith("--"):
        argv.append(change.replace("INIT_B", str(runs / "init_b")))
    elif change == "edit the data":
        demos.write_bytes(original.replace(b"=>", b"=> ", 1))
    else:
        _permute_two_tokens(workdir)
    before = _stage_and_config(workdir)
    try:
        assert main(argv) == 2
    finally:
        demos.write_bytes(original)
    err = capsys.readouterr().err
    assert f"{workdir}/sft/checkpoints/2 was made from other inputs than this run's: {named}" in err, err
    assert len(err.strip().splitlines()) == 1
    assert _stage_and_config(workdir) == before  # config.json not rewritten, no step trained


def test_a_finished_stage_with_another_learning_rate_is_refused_and_a_plain_rerun_reuses_it(runs, tmp_path,
                                                                                            capsys):
    """Before: the rerun recorded the new learning rate in config.json; the export was unchanged."""
    workdir = _copy(runs, "finished", tmp_path)
    before = _stage_and_config(workdir)
    assert main(["sft", "--workdir", str(workdir), "--sft.optim.learning_rate=0.01"]) == 2
    assert (f"{workdir}/sft/export was made from other inputs than this run's: sft.optim.learning_rate: saved "
            "0.003, this run 0.01" in capsys.readouterr().err)
    assert main(["sft", "--workdir", str(workdir)]) == 0  # the same inputs: its export, nothing trained again
    assert f"sft export: {workdir}/sft/export" in capsys.readouterr().out
    assert _stage_and_config(workdir) == before


def test_the_pipeline_with_another_seed_on_a_run_is_refused_before_rewriting_its_task(runs, tmp_path, capsys):
    """Before: the task's files were rewritten for seed 1 and the seed-0 models evaluated on them."""
    workdir = _copy(runs, "finished", tmp_path)
    before = _stage_and_config(workdir)
    assert main(["pipeline", "--workdir", str(workdir), "--seed=1"]) == 2
    assert (f"seed=1: {workdir}/data/task holds the embedded task made with seed 0, which the stages in "
            f"{workdir} were trained on; rerun with --seed=0" in capsys.readouterr().err)
    assert _stage_and_config(workdir) == before


def test_comparisons_from_another_labeler_file_are_refused_not_returned_as_the_old_ones(runs, tmp_path, capsys):
    workdir = _copy(runs, "stopped", tmp_path)
    first, second = (write_marker_comparisons(tmp_path / f"human_{i}.jsonl", 12, seed=i) for i in (0, 1))
    assert main(["comparisons", "--workdir", str(workdir), f"--comparisons.labeler={first}"]) == 0
    before = tree_digest(workdir / "comparisons")
    assert main(["comparisons", "--workdir", str(workdir), f"--comparisons.labeler={second}"]) == 2
    assert (f"{workdir}/comparisons was made from other inputs than this run's: comparisons.labeler: saved "
            f"{first} (" in capsys.readouterr().err)
    assert main(["comparisons", "--workdir", str(workdir), f"--comparisons.labeler={first}"]) == 0
    assert tree_digest(workdir / "comparisons") == before


def test_ppo_inputs_tell_one_reward_model_from_another_and_an_export_by_what_it_was_made_from(runs, tmp_path):
    """Every stage records its inputs by the same walk of its config block: PPO's three
    parameter sources each by identity (here: two reward models of one architecture)."""
    rm_a, rm_b = (_export_random(ScalarModel(TINY_MODEL), tmp_path / f"rm_{i}", i, {"stage": "rm"}) for i in (5, 6))
    env = common.make_env(tiny_config(runs / "demos.jsonl"), runs / "finished", "ppo")
    ppo = dataclasses.replace(env.cfg.ppo, policy_init="run:sft/export", reward_init=str(rm_a))
    first = provenance.stage_inputs(env, "ppo", ppo)
    again = provenance.stage_inputs(env, "ppo", ppo)
    swapped = provenance.stage_inputs(env, "ppo", dataclasses.replace(ppo, reward_init=str(rm_b)))
    assert provenance.changes(first, again) == []
    (change,) = provenance.changes(first, swapped)
    assert change.startswith(f"ppo.reward_init: saved {rm_a} (") and f"this run {rm_b} (" in change
    # the SFT export is known by the inputs it was made from, so exporting it again keeps it
    sft_meta = checkpoint.read_export_meta(runs / "finished" / "sft" / "export")
    assert first["ppo.policy_init"]["sha256"] == "made from " + provenance._digest_of(sft_meta["inputs"])


def _flip_a_low_bit(export: pathlib.Path) -> pathlib.Path:
    largest = max((p for p in (export / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 1
    largest.write_bytes(bytes(data))
    return largest


def test_a_damaged_export_is_refused_naming_the_file_and_its_stage_exports_it_again(runs, tmp_path, capsys):
    """Before: a flipped bit loaded silently (the RM trained on it, convert --to-hf wrote it)."""
    workdir = _copy(runs, "finished", tmp_path)
    export = workdir / "sft" / "export"
    mesh, model = sharding.make_mesh(MESH), LanguageModel(TINY_MODEL)
    want, _ = parameters.load("run:sft/export", model, mesh, "rm.init_from", workdir)
    damaged = _flip_a_low_bit(export).relative_to(export)
    named = f"{export} is damaged: {damaged} changed since it was written (checksum mismatch)"
    with pytest.raises(checkpoint.CheckpointError) as refused:
        parameters.load("run:sft/export", model, mesh, "rm.init_from", workdir)
    assert named in str(refused.value)
    assert main(["convert", "--to-hf", str(export), "--out", str(tmp_path / "hf")]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["sft", "--workdir", str(workdir)]) == 0  # the stage makes it again from its last checkpoint
    assert f"{export} is damaged ({damaged} changed" in capsys.readouterr().err
    got, _ = parameters.load("run:sft/export", model, mesh, "rm.init_from", workdir)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
