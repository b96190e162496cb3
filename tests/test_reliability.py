"""Faults met by trying the CLI as a new user would (issue 19): SIGTERM inside
``rlhf-jax pipeline``, two commands in one run directory, inputs that used to crash or
train nothing, ``metrics.jsonl`` after a kill, and the noise around a refused restore.

Every test goes through ``rlhf_jax.cli`` (in this process, or in a subprocess where a signal
or a second process is the point). ``docs/fault_tolerance.md`` lists what each one shows.
"""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from rlhf_jax import checkpoint
from rlhf_jax.cli import main
from rlhf_jax.config import save_config
from rlhf_jax.logging import read_metrics
from rlhf_jax.stages import common
from tests.helpers import (REPO, cli_env, finish_cli, rm_config, start_cli, tiny_config, tree_digest,
                           write_demonstrations, write_experiment)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> pathlib.Path:
    """The embedded task's files (tokenizer), made once and copied into each run directory."""
    return common.task_files(tmp_path_factory.mktemp("task"), 0)["manifest"].parent


@pytest.fixture
def run(tmp_path, task_dir):
    """``(workdir, demos)``: a run directory holding the task files, and 64 demonstrations."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(task_dir, workdir / "data" / "task")
    return workdir, write_demonstrations(tmp_path / "demos.jsonl", 64)


def _logged_steps(path: pathlib.Path) -> list[int]:
    try:
        return [int(line["step"]) for line in map(json.loads, path.read_text().splitlines()) if line]
    except (OSError, ValueError):  # not written yet
        return []


# ---- 1. SIGTERM inside the pipeline ----------------------------------------------------------

@pytest.mark.slow
def test_sigterm_in_the_pipeline_stops_after_the_stage_saves_and_a_rerun_finishes(tmp_path):
    from tests.test_pipeline import micro_config

    cfg = micro_config()
    cfg = dataclasses.replace(
        cfg, pretrain=dataclasses.replace(cfg.pretrain, max_steps=300, log_every=1,
                                          checkpoint=dataclasses.replace(cfg.pretrain.checkpoint, save_every=1000)),
        pipeline=dataclasses.replace(cfg.pipeline, methods=("ppo",), best_of_n=0, frontier=(), eval_samples=1,
                                     heldout_prompts=None))
    experiment = write_experiment(cfg, tmp_path / "experiment.py")
    workdir = tmp_path / "run"
    command = ("pipeline", "--config", str(experiment), "--workdir", str(workdir))
    proc = start_cli(*command)
    deadline = time.monotonic() + 300
    while not any(s > 0 for s in _logged_steps(workdir / "pretrain" / "metrics.jsonl")):
        assert proc.poll() is None, finish_cli(proc)[1][-3000:]
        assert time.monotonic() < deadline, "no pretraining step logged"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish_cli(proc)
    assert rc == 0, out[-3000:]
    (saved,) = checkpoint.finished_steps(workdir / "pretrain" / "checkpoints")  # the SIGTERM's save only
    assert 0 < saved < 300
    assert f"interrupted in stage pretrain at step {saved}; rerun the same command to resume" in out
    assert "error" not in out and not (workdir / "sft").exists()  # the next stage never started

    rc, out = finish_cli(start_cli(*command))
    assert rc == 0, out[-3000:]
    assert "report:" in out and (workdir / "report.md").exists()
    assert json.loads((workdir / "pretrain" / "export" / "export.json").read_text())["steps"] == 300


# ---- 4. inputs that crashed or lied ------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("--sft.checkpoint.save_every=0", "sft.checkpoint.save_every must be >= 1, got 0"),
    ("--sft.log_every=0", "sft.log_every must be >= 1, got 0"),
    ("--sft.optim.grad_accum_steps=0", "sft.optim.grad_accum_steps must be >= 1, got 0"),
    ("--sft.data.max_len=0", "sft.data.max_len must be >= 2, got 0"),
    ("--sft.max_steps=-5", "sft.max_steps must be >= 1 (or None), got -5"),
    ("--stop-after-steps=0", "--stop-after-steps must be >= 1, got 0"),
])
def test_bad_values_are_refused_naming_the_field_and_config_json_is_kept(run, capsys, override, field):
    workdir, demos = run
    save_config(tiny_config(demos, steps=4), workdir / "config.json")
    before = tree_digest(workdir)
    assert main(["sft", "--workdir", str(workdir), override]) == 2
    assert field in capsys.readouterr().err
    assert tree_digest(workdir) == before  # config.json not rewritten, nothing else written


def test_a_training_file_smaller_than_one_batch_is_refused(run, capsys):
    workdir, _ = run
    few = write_demonstrations(workdir.parent / "few.jsonl", 3)
    cfg = tiny_config(few, batch_size=8)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, max_steps=None, epochs=1))
    assert main(["sft", "--config", str(write_experiment(cfg, workdir.parent / "exp.py")),
                 "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "few.jsonl: 3 rows, fewer than one batch of sft.data.batch_size=8" in err
    assert not (workdir / "sft").exists() and not (workdir / "config.json").exists()  # no export of the init


def test_comparisons_that_are_all_ties_are_refused(run, capsys):
    workdir, demos = run
    ties = workdir.parent / "ties.jsonl"
    ties.write_text('{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]}\n' * 16)
    cfg = rm_config(tiny_config(demos), ties, batch_size=8)
    cfg = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, max_steps=None))
    assert main(["rm", "--config", str(write_experiment(cfg, workdir.parent / "exp.py")),
                 "--workdir", str(workdir)]) == 2
    assert "ties.jsonl: every comparison is a tie (16 comparisons, 0 pairs with different ranks)" in \
        capsys.readouterr().err
    assert not (workdir / "rm").exists() and not (workdir / "config.json").exists()


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["sft", "--workdir", str(blocker / "run"), "--sft.max_steps=2"]) == 2
    assert f"--workdir {blocker / 'run'}: cannot write there" in capsys.readouterr().err
    if os.geteuid() == 0:  # root writes through permission bits: a read-only directory is not one here
        return
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    assert main(["sft", "--workdir", str(read_only), "--sft.max_steps=2"]) == 2
    assert f"--workdir {read_only}: cannot write there (Permission denied" in capsys.readouterr().err
    assert list(read_only.iterdir()) == []


# ---- 3. two processes in one run directory -----------------------------------------------------

def test_a_second_command_in_one_workdir_is_refused_and_a_dead_holders_lock_is_not(run, capsys):
    workdir, demos = run
    experiment = str(write_experiment(tiny_config(demos, steps=2, save_every=2), workdir.parent / "exp.py"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rlhf_jax.run_lock import hold_run_directory\n"
         "with hold_run_directory(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(workdir)],
        env=cli_env(), stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_digest(workdir)
        assert main(["sft", "--config", experiment, "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert f"--workdir {workdir} is in use by process {holder.pid} on " in err, err
        assert tree_digest(workdir) == before
    finally:
        holder.kill()  # like kill -9: no cleanup, the lock file stays
        holder.wait()
    assert (workdir / ".lock").exists()
    assert main(["sft", "--config", experiment, "--workdir", str(workdir)]) == 0  # the kernel freed the lock
    assert (workdir / "sft" / "export" / "export.json").exists()


# ---- 5. metrics.jsonl after a crash ------------------------------------------------------------

def test_metrics_after_a_kill_describe_one_run_and_a_torn_line_is_dropped(run, capsys):
    """The file as ``kill -9`` before the first checkpoint leaves it: the step-0 truncation
    count, a step line, and a last line cut mid-write. The rerun starts from step 0."""
    workdir, demos = run
    long = '{"prompt": "reverse : %s=>", "response": "b a"}\n' % ("a b " * 20)
    demos.write_text(demos.read_text() + long)
    experiment = str(write_experiment(tiny_config(demos, steps=4, save_every=4), workdir.parent / "exp.py"))
    metrics = workdir / "sft" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 0, "data/truncated_examples": 1.0}\n{"step": 2, "train/loss": 5.0}\n'
                       '{"step": 4, "train/lo')
    assert main(["sft", "--config", experiment, "--workdir", str(workdir)]) == 0
    assert f"warning: {metrics}:3: dropped a torn last line" in capsys.readouterr().err
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == [0, 2, 4]  # one step-0 line, not two
    assert records[0] == {"step": 0, "data/truncated_examples": 1.0}
    assert records[1]["train/loss"] != 5.0  # the rerun's own step 2 replaced the lost run's


def test_a_nan_is_stored_as_valid_json_and_no_checkpoint_is_no_checkpoint_yet(run, capsys):
    workdir, demos = run
    experiment = str(write_experiment(tiny_config(demos, steps=6, save_every=1000), workdir.parent / "exp.py"))
    assert main(["sft", "--config", experiment, "--workdir", str(workdir), "--sft.optim.learning_rate=1e30"]) == 2
    err = capsys.readouterr().err
    assert "step 2: optim/grad_norm is nan" in err and "there is no checkpoint yet in" in err, err
    assert "step None" not in err

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    lines = (workdir / "sft" / "metrics.jsonl").read_text().splitlines()
    bad = json.loads(lines[-1], parse_constant=no_constants)
    assert bad["step"] == 2 and bad["optim/grad_norm"] == "NaN"
    assert math.isnan(read_metrics(workdir / "sft" / "metrics.jsonl")[-1]["optim/grad_norm"])


# ---- 6. the messages themselves ----------------------------------------------------------------

def test_a_truncated_jsonl_line_is_named_without_a_doubled_word(run, capsys):
    workdir, _ = run
    bad = workdir.parent / "bad.jsonl"
    bad.write_text('{"prompt": "reverse : a b =>", "response": "b a"}\n{"prompt": "reverse : a b =>", "resp')
    assert main(["sft", "--workdir", str(workdir), f"--sft.data.train_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: not valid JSON (truncated line?): Unterminated string starting at column 32" in err, err
    assert "at at" not in err


@pytest.mark.slow
def test_a_refused_restore_prints_one_error_line_and_no_asyncio_noise(run):
    workdir, demos = run
    experiment = str(write_experiment(tiny_config(demos, steps=4, save_every=2), workdir.parent / "exp.py"))
    rc, out = finish_cli(start_cli("sft", "--config", experiment, "--workdir", str(workdir), "--stop-after-steps", "2"))
    assert rc == 0, out[-3000:]
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--workdir", str(workdir),
                           "--model.d_model=64"], env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]  # one line
    # the saved model config is compared before any array is read, naming the field
    assert ("sft/checkpoints/2: written for a different model (model.d_model: saved 32, this run 64); "
            "use the original model config, or a new --workdir" in proc.stderr)


# ---- 2. a damaged checkpoint -------------------------------------------------------------------

def _flip_bytes(step_dir: pathlib.Path) -> None:
    data = max((p for p in step_dir.glob("state/ocdbt.process_0/d/*")), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def _truncate_data(step_dir: pathlib.Path) -> None:
    data = max((p for p in step_dir.glob("state/ocdbt.process_0/d/*")), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


DAMAGE = {
    "flipped-bytes": _flip_bytes,
    "truncated-data": _truncate_data,
    "deleted-metadata": lambda step_dir: (step_dir / "state" / "_METADATA").unlink(),
    "truncated-metadata": lambda step_dir: (step_dir / "state" / "_METADATA").write_text(
        (step_dir / "state" / "_METADATA").read_text()[:40]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(run, damage):
    workdir, demos = run
    experiment = str(write_experiment(tiny_config(demos, steps=6, save_every=2), workdir.parent / "exp.py"))
    rc, out = finish_cli(start_cli("sft", "--config", experiment, "--workdir", str(workdir), "--stop-after-steps", "4"))
    assert rc == 0, out[-3000:]
    ckpt_dir = workdir / "sft" / "checkpoints"
    assert checkpoint.finished_steps(ckpt_dir) == [2, 4]
    DAMAGE[damage](ckpt_dir / "4")
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--workdir", str(workdir)], env=cli_env(),
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {ckpt_dir}/4 is damaged: " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert (workdir / "sft" / "damaged_checkpoints" / "4").is_dir()  # set aside, not deleted
    assert [r["step"] for r in read_metrics(workdir / "sft" / "metrics.jsonl")] == [2, 4, 6]  # resumed at 2
    assert (workdir / "sft" / "export" / "export.json").exists()


@pytest.mark.slow
def test_when_every_checkpoint_is_damaged_the_message_names_the_steps(run):
    workdir, demos = run
    experiment = str(write_experiment(tiny_config(demos, steps=6, save_every=2), workdir.parent / "exp.py"))
    rc, out = finish_cli(start_cli("sft", "--config", experiment, "--workdir", str(workdir), "--stop-after-steps", "4"))
    assert rc == 0, out[-3000:]
    ckpt_dir = workdir / "sft" / "checkpoints"
    for step in (2, 4):
        _flip_bytes(ckpt_dir / str(step))
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--workdir", str(workdir)], env=cli_env(),
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert f"rlhf-jax sft: error: {ckpt_dir}: every checkpoint is damaged (steps [4, 2]" in proc.stderr
    assert "Traceback" not in proc.stderr
