"""Faults a real run meets: ``kill -9`` after a checkpoint, SIGTERM (preemption), a NaN, and
bad input. Each must end with a clear message and lose nothing: a rerun of the same command
finishes with exactly the params of an uninterrupted run, and a refused run leaves the
checkpoints and data it found byte for byte as they were.

The kill and SIGTERM tests run the real CLI (``python -m rlhf_jax.cli``) in a subprocess
with the same 8 CPU devices as this process, so its results must equal a run here exactly.
``docs/fault_tolerance.md`` is the table of what these tests show.
"""

import dataclasses
import hashlib
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, parameters, sharding, steps
from rlhf_jax.checkpoint import CheckpointError
from rlhf_jax.config import (CheckpointConfig, DataConfig, MeshConfig, OptimConfig, PPOConfig, SamplingConfig,
                             apply_overrides)
from rlhf_jax.data import DataError
from rlhf_jax.logging import read_metrics
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.sharding import ShardingError
from rlhf_jax.stages import common
from rlhf_jax.stages.ppo import run_ppo
from rlhf_jax.stages.rm import run_rm
from rlhf_jax.stages.sft import run_sft
from tests.helpers import (TINY_MODEL, finish_cli, rm_config, start_cli, tiny_config, write_demonstrations,
                           write_experiment, write_marker_comparisons)

REPO = pathlib.Path(__file__).parents[1]
SFT_STEPS, RM_STEPS, PPO_ITERATIONS = 40, 30, 12


# ---- configs and runs -----------------------------------------------------------------------

def _base(data_dir: pathlib.Path):
    demos = data_dir / "demos.jsonl"
    if not demos.exists():
        write_demonstrations(demos, 64)
        write_marker_comparisons(data_dir / "comparisons.jsonl", 40)
    cfg = tiny_config(demos, steps=SFT_STEPS, save_every=2, dropout=0.1)  # dropout: the RNG resumes too
    cfg = rm_config(cfg, data_dir / "comparisons.jsonl", steps=RM_STEPS)
    ppo = PPOConfig(
        # task prompts have up to 16 tokens: some are cut (on_too_long='truncate'), and counted
        prompts=DataConfig(train_path="task:prompts", val_path=None, batch_size=16, max_len=12),
        pretrain=DataConfig(train_path="task:pretrain", val_path=None, batch_size=8, max_len=32),
        minibatch_size=8, iterations=PPO_ITERATIONS,
        policy_optim=OptimConfig(learning_rate=3e-3, final_lr_fraction=1.0),
        value_optim=OptimConfig(learning_rate=3e-3, final_lr_fraction=1.0),
        checkpoint=CheckpointConfig(save_every=2), eval_every=1000, adaptive_kl=True, kl_target=1.0)
    return dataclasses.replace(cfg, ppo=ppo, rm=dataclasses.replace(cfg.rm, checkpoint=CheckpointConfig(save_every=2)),
                               generation=dataclasses.replace(cfg.generation,
                                                              sampling=SamplingConfig(max_new_tokens=6)))


def _with_saves(cfg, stage: str, save_every: int):
    """The same training with checkpoints every ``save_every`` steps (params do not change)."""
    every = CheckpointConfig(save_every=save_every, keep=2)
    return dataclasses.replace(cfg, **{stage: dataclasses.replace(getattr(cfg, stage), checkpoint=every)})


def _run_here(cfg, stage: str, workdir: pathlib.Path):
    if stage == "sft":
        return run_sft(cfg, workdir, show_progress=False)
    if stage == "rm":
        return run_rm(cfg, workdir, show_progress=False)
    return run_ppo(cfg, workdir, show_progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def ppo_inputs(data_dir, tmp_path_factory):
    """``ppo_inputs()``: a run directory holding what ``rlhf-jax ppo`` starts from, an SFT
    export (the policy) and an RM export; made once, copied into each PPO run."""
    made, task = [], []

    def task_dir() -> pathlib.Path:
        if not task:
            task.append(common.task_files(tmp_path_factory.mktemp("task"), 0)["manifest"].parent)
        return task[0]

    def get() -> pathlib.Path:
        if not made:
            workdir = tmp_path_factory.mktemp("ppo_inputs")
            shutil.copytree(task_dir(), workdir / "data" / "task")
            cfg = _base(data_dir)
            few = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, max_steps=2),
                                      rm=dataclasses.replace(cfg.rm, max_steps=2))
            run_sft(few, workdir, show_progress=False)
            run_rm(few, workdir, show_progress=False)
            made.append(workdir)
        return made[0]

    get.task_dir = task_dir
    return get


def _new_workdir(path: pathlib.Path, stage: str, ppo_inputs) -> pathlib.Path:
    """A run directory; for PPO, a copy of ``ppo_inputs``. Either way it starts with the
    embedded task's files (the tokenizer), copied rather than generated again."""
    if stage == "ppo":
        shutil.copytree(ppo_inputs(), path)
    else:
        shutil.copytree(ppo_inputs.task_dir(), path / "data" / "task")
    return path


@pytest.fixture(scope="module")
def reference(data_dir, ppo_inputs, tmp_path_factory):
    """``reference(stage)``: the export directory of an uninterrupted run here (made once)."""
    runs = {}

    def get(stage: str) -> pathlib.Path:
        if stage not in runs:
            workdir = _new_workdir(tmp_path_factory.mktemp(f"straight_{stage}") / "run", stage, ppo_inputs)
            runs[stage] = _run_here(_base(data_dir), stage, workdir)
        return runs[stage]

    return get


def _start(cfg, stage: str, workdir: pathlib.Path) -> subprocess.Popen:
    """``rlhf-jax <stage> --config <cfg> --workdir <workdir>`` in a fresh process."""
    experiment = write_experiment(cfg, workdir.parent / f"experiment_{stage}.py")
    return start_cli(stage, "--config", str(experiment), "--workdir", str(workdir))


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    return finish_cli(proc, timeout=300)


def _wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            rc, out = _finish(proc)
            pytest.fail(f"exited {rc} before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.02)


def _logged_steps(workdir: pathlib.Path, stage: str) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(workdir / stage / "metrics.jsonl")]
    except (OSError, ValueError):  # not written yet, or a line half written
        return []


def _model(stage: str):
    return ScalarModel(TINY_MODEL) if stage == "rm" else LanguageModel(TINY_MODEL)


def _assert_same_export(a: pathlib.Path, b: pathlib.Path, stage: str) -> None:
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    target = parameters.create(_model(stage), mesh, jax.random.PRNGKey(0))[0]
    leaves = [jax.tree.leaves(checkpoint.load_export(d, target)) for d in (a, b)]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for x, y in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _total(stage: str) -> int:
    return {"sft": SFT_STEPS, "rm": RM_STEPS, "ppo": PPO_ITERATIONS}[stage]


# ---- kill -9 and SIGTERM ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_kill_9_after_a_checkpoint_then_rerun_is_exact(tmp_path, data_dir, reference, ppo_inputs, stage):
    cfg = _with_saves(_base(data_dir), stage, 2)
    workdir = _new_workdir(tmp_path / "run", stage, ppo_inputs)
    ckpt_dir = workdir / stage / "checkpoints"
    proc = _start(cfg, stage, workdir)
    _wait_until(proc, lambda: checkpoint.finished_steps(ckpt_dir), "a checkpoint")
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was half written stays
    rc, out = _finish(proc)
    assert rc == -signal.SIGKILL, out[-3000:]
    killed_at = checkpoint.finished_steps(ckpt_dir)[-1]
    assert killed_at < _total(stage) and not (workdir / stage / "export").exists(), "killed too late to test"

    rc, out = _finish(_start(cfg, stage, workdir))  # the same command again
    assert rc == 0, out[-3000:]
    assert f"{stage} export:" in out
    _assert_same_export(workdir / stage / "export", reference(stage), stage)
    # metrics.jsonl describes one run: the lines the killed run wrote past its checkpoint are gone
    assert _logged_steps(workdir, stage) == _logged_steps(reference(stage).parent.parent, stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "ppo"])  # train_loop (SFT, RM, pretrain) and the PPO loop
def test_sigterm_saves_the_current_step_exits_0_and_rerun_is_exact(tmp_path, data_dir, reference, ppo_inputs,
                                                                  stage):
    cfg = _with_saves(_base(data_dir), stage, 1000)  # no periodic saves: only the one SIGTERM makes
    workdir = _new_workdir(tmp_path / "run", stage, ppo_inputs)
    proc = _start(cfg, stage, workdir)
    _wait_until(proc, lambda: any(s > 0 for s in _logged_steps(workdir, stage)), "a training step")
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
    assert "stopped early; rerun to resume" in out
    (stopped_at,) = checkpoint.finished_steps(workdir / stage / "checkpoints")
    assert 0 < stopped_at < _total(stage)
    assert max(_logged_steps(workdir, stage)) == stopped_at  # the step it stopped at was logged and saved

    rc, out = _finish(_start(cfg, stage, workdir))
    assert rc == 0, out[-3000:]
    _assert_same_export(workdir / stage / "export", reference(stage), stage)


@pytest.mark.slow
def test_truncated_prompts_are_counted_in_the_metrics(reference):
    """PPO prompts over ``prompts.max_len`` are cut (the default ``on_too_long='truncate'``)
    and the count is the first line of metrics.jsonl; SFT and RM do the same for examples."""
    first = read_metrics(reference("ppo").parent.parent / "ppo" / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["data/truncated_prompts"] > 0


# ---- NaN ----------------------------------------------------------------------------------

def test_nan_stops_naming_step_and_metric_and_the_last_checkpoint_is_finite(tmp_path, data_dir, capsys):
    # lr 1e30: step 1's Adam update moves every weight by ~1e30 (finite in float32); step 2's
    # activations overflow and its loss and gradients are NaN
    from rlhf_jax.cli import main

    cfg = tiny_config(_base(data_dir).sft.data.train_path, steps=6, save_every=1)
    experiment = write_experiment(cfg, tmp_path / "experiment.py")
    # the CLI reports the NonFiniteError (rlhf_jax.stages.common) as one error line and exits 2
    assert main(["sft", "--config", str(experiment), "--workdir", str(tmp_path / "run"),
                 "--sft.optim.learning_rate=1e30"]) == 2
    cfg = apply_overrides(cfg, ["--sft.optim.learning_rate=1e30"])
    message = capsys.readouterr().err.split("rlhf-jax sft: error: ", 1)[1]
    assert message.startswith("step 2: optim/grad_norm is nan"), message
    assert "sft/loss" in message and "the last good checkpoint is step 1" in message

    ckpts = checkpoint.StageCheckpoints(tmp_path / "run" / "sft" / "checkpoints", cfg.sft.checkpoint)
    assert ckpts.manager.all_steps() == [1]  # nothing from step 2 was saved
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    state, _ = steps.create_train_state(LanguageModel(TINY_MODEL), make_optimizer(cfg.sft.optim, 6), mesh,
                                        jax.random.PRNGKey(0))
    restored, meta = ckpts.restore(state)
    assert meta["step"] == 1
    for leaf in jax.tree.leaves(restored):
        assert np.isfinite(np.asarray(leaf)).all()
    assert not (tmp_path / "run" / "sft" / "export").exists()


# ---- bad input: a clear error, and the run directory and data as they were ----------------------

LONG_PROMPT = "reverse : " + "a b " * 20 + "=>"  # 43 tokens: over data.max_len=32


def _tree_digest(*roots: pathlib.Path) -> dict[str, str]:
    """Every file under ``roots`` (or the file itself) -> sha256 of its bytes."""
    digest = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _assert_nothing_lost(before: dict[str, str], after: dict[str, str], workdir: pathlib.Path) -> None:
    """Every file is still there with the same bytes; the only new files are entries of the
    data cache (a valid JSONL file is stored before a record in it is found too long)."""
    assert {k: after.get(k) for k in before} == before
    new = [k for k in after if k not in before]
    assert all(k.startswith(str(workdir / "data" / "cache") + "/") for k in new), new


@pytest.fixture(scope="module")
def started_run(data_dir, tmp_path_factory):
    """A run stopped after 2 of 4 SFT steps (checkpoint 2 on disk), on demonstrations whose
    last line is too long for data.max_len (truncated, and counted at step 0)."""
    root = tmp_path_factory.mktemp("started")
    demos = root / "demos.jsonl"
    _base(data_dir)  # writes data_dir/demos.jsonl if no earlier test has
    demos.write_text((data_dir / "demos.jsonl").read_text()
                     + '{"prompt": "%s", "response": "b a"}\n' % LONG_PROMPT)
    cfg = tiny_config(demos, steps=4, save_every=2)
    assert run_sft(cfg, root / "run", show_progress=False, stop_after=2) is None
    return cfg, root


@pytest.fixture
def copy_of_started(started_run, tmp_path):
    cfg, root = started_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, data=dataclasses.replace(
        cfg.sft.data, train_path=str(tmp_path / "demos.jsonl"))))
    return cfg, tmp_path / "run", tmp_path / "demos.jsonl"


def test_started_run_counted_its_truncated_example(started_run):
    cfg, root = started_run
    first = read_metrics(root / "run" / "sft" / "metrics.jsonl")[0]
    assert first == {"step": 0, "data/truncated_examples": 1.0}


def _sft_data(cfg, path, **changes):
    return dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, data=dataclasses.replace(
        cfg.sft.data, train_path=str(path), **changes)))


GOOD = '{"prompt": "reverse : a b =>", "response": "b a"}\n'


@pytest.mark.parametrize("content, changes, error, message", [
    (GOOD * 3 + '{"prompt": "reverse : a b =>", "resp', {}, DataError,
     r"bad\.jsonl:4: not valid JSON \(truncated line\?\)"),
    (GOOD + "{'prompt': 'reverse'}\n" + GOOD, {}, DataError, r"bad\.jsonl:2: not valid JSON"),
    (GOOD * 2 + '{"prompt": "reverse : a b =>", "response": ""}\n', {}, DataError,
     r'bad\.jsonl:3: field "response" is empty'),
    (GOOD + '{"prompt": "%s", "response": "b a"}\n' % LONG_PROMPT, {"on_too_long": "error"}, DataError,
     r"bad\.jsonl:2: prompt \+ response \+ EOS is 4\d tokens, more than data.max_len=32"),
    ("", {}, DataError, r"bad\.jsonl: no records"),
], ids=["truncated", "malformed", "empty-response", "too-long", "empty-file"])
def test_bad_training_data_is_refused_before_anything_is_written(copy_of_started, content, changes, error,
                                                                 message):
    cfg, workdir, _ = copy_of_started
    bad = workdir.parent / "bad.jsonl"
    bad.write_text(content)
    before = _tree_digest(workdir, bad)
    with pytest.raises(error, match=message):
        run_sft(_sft_data(cfg, bad, **changes), workdir, show_progress=False)
    _assert_nothing_lost(before, _tree_digest(workdir, bad), workdir)


def test_too_long_examples_can_be_an_error_instead(copy_of_started):
    """The started run's own data, now with on_too_long='error': its last line is named."""
    cfg, workdir, demos = copy_of_started
    before = _tree_digest(workdir, demos)
    with pytest.raises(DataError, match=r"demos\.jsonl:65: prompt \+ response \+ EOS is 46 tokens"):
        run_sft(_sft_data(cfg, demos, on_too_long="error"), workdir, show_progress=False)
    _assert_nothing_lost(before, _tree_digest(workdir, demos), workdir)


def test_ranks_of_the_wrong_length_are_refused(copy_of_started):
    cfg, workdir, _ = copy_of_started
    bad = workdir.parent / "comparisons.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]}\n'
                   '{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1]}\n')
    before = _tree_digest(workdir, bad)
    with pytest.raises(DataError, match=r'comparisons\.jsonl:2: field "ranks" has 2 entries but "responses" has 3'):
        run_rm(rm_config(cfg, bad), workdir, show_progress=False)
    assert _tree_digest(workdir, bad) == before
    assert not (workdir / "rm").exists()


# Orbax leaves the coroutines of a refused restore unawaited; the error itself is ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_of_another_model_is_refused_and_left_as_it_was(copy_of_started):
    cfg, workdir, demos = copy_of_started
    before = _tree_digest(workdir, demos)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64))
    with pytest.raises(CheckpointError, match=r"sft/checkpoints/2: written for a different model "
                                              r"\(model.d_model: saved 32, this run 64\)"):
        run_sft(wider, workdir, show_progress=False)
    deeper = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=3))
    with pytest.raises(CheckpointError, match=r"sft/checkpoints/2: written for a different model "
                                              r"\(model.n_layers: saved 2, this run 3\)"):
        run_sft(deeper, workdir, show_progress=False)
    assert _tree_digest(workdir, demos) == before
    # and the original command still resumes from it
    assert run_sft(cfg, workdir, show_progress=False) is not None


def test_mesh_that_does_not_fit_the_devices_is_refused(copy_of_started):
    cfg, workdir, demos = copy_of_started
    before = _tree_digest(workdir, demos)
    with pytest.raises(ShardingError, match=r"needs 12 devices but 8 are available"):
        run_sft(dataclasses.replace(cfg, mesh=MeshConfig(data=3, fsdp=2, tensor=2)), workdir, show_progress=False)
    with pytest.raises(ShardingError, match=r"do not divide the 8 available devices"):
        run_sft(dataclasses.replace(cfg, mesh=MeshConfig(data=-1, fsdp=3)), workdir, show_progress=False)
    assert _tree_digest(workdir, demos) == before


def test_unknown_config_fields_are_refused(copy_of_started, capsys):
    from rlhf_jax.cli import main

    cfg, workdir, demos = copy_of_started
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--workdir", str(workdir), "--sft.optim.learnig_rate=1e-3"])
    assert exit_.value.code == 2 and "learnig_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        apply_overrides(cfg, ["--sft.optim.learning_rate=fast"])
    capsys.readouterr()
    # a hand-edited config.json in the run directory
    saved = workdir / "config.json"
    saved.write_text(saved.read_text().replace('"seed": 0', '"seed": 0, "sede": 1'))
    before = _tree_digest(workdir, demos)
    assert main(["sft", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert str(saved) in err and "sede" in err
    assert _tree_digest(workdir, demos) == before
