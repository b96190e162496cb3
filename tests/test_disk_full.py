"""A full disk (issue 30): training ends in one line and frees the run directory, a checkpoint
that cannot be written is one line too, and a report is never left cut.

Each test runs on a small tmpfs it mounts (root on Linux); where the machine does not allow
one it is skipped, saying why. ``docs/fault_tolerance.md`` lists what each shows.
"""

import dataclasses
import json
import os
import pathlib
import struct
import subprocess
import time

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint
from rlhf_jax.cli import main
from rlhf_jax.config import CheckpointConfig
from rlhf_jax.failures import one_line, quiet_background_failures
from rlhf_jax.logging import EventsFile
from rlhf_jax.report import PLOTS, write_report
from rlhf_jax.run_lock import hold_run_directory
from tests.helpers import finish_cli, start_cli, tiny_config, tree_digest, write_demonstrations, write_experiment


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here to fill (not root, or no mount permission in this container): "
                    f"{mount.stderr.strip() or mount.returncode}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: pathlib.Path, leave: int = 0) -> pathlib.Path:
    """Fills ``disk`` up, then frees ``leave`` bytes; returns the filler file (delete it to free space)."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def test_a_full_disk_during_training_is_one_line_frees_the_lock_and_the_rerun_resumes(small_disk, tmp_path, capsys):
    """Before: TensorBoard's writer thread died on ENOSPC, the next metrics line blocked on its
    queue forever, SIGTERM was ignored and the run lock stayed held."""
    demos = write_demonstrations(tmp_path / "demos.jsonl", 32)
    cfg = tiny_config(demos, steps=400, save_every=1000)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, log_every=1, eval_every=1000))
    command = ("sft", "--config", str(write_experiment(cfg, tmp_path / "exp.py")), "--workdir",
               str(small_disk / "run"))
    proc = start_cli(*command)
    metrics = small_disk / "run" / "sft" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.stat().st_size > 300):  # a few steps logged
        assert proc.poll() is None, finish_cli(proc)[1][-3000:]
        assert time.monotonic() < deadline, "no step logged"
        time.sleep(0.02)
    filler = fill(small_disk)
    rc, out = finish_cli(proc, timeout=120)  # the old code hung here until killed
    errors = [line for line in out.splitlines() if "rlhf-jax sft: error:" in line]
    assert rc == 2 and len(errors) == 1, out[-3000:]
    assert "no space left on device writing " in errors[0] and "free space and rerun" in errors[0]
    assert "Traceback" not in out
    with hold_run_directory(small_disk / "run"):  # the lock went with the process
        pass
    filler.unlink()  # space again: the same command runs (here two steps of it, in this process)
    assert main([*command, "--stop-after-steps=2"]) == 0
    assert "sft: stopped early; rerun to resume" in capsys.readouterr().out


def test_a_checkpoint_that_finds_the_disk_full_is_one_line_without_background_tracebacks(small_disk, capfd):
    """Orbax writes in threads; their failure reaches the main thread at the next wait, and
    their own tracebacks (absl ERROR records, TensorStore's "Event loop is closed") are dropped."""
    fill(small_disk, leave=256 << 10)
    ckpts = checkpoint.StageCheckpoints(small_disk / "checkpoints", CheckpointConfig())
    state = {"weights": jax.random.normal(jax.random.PRNGKey(0), (1 << 20,))}  # 4 MiB that do not compress
    remove = quiet_background_failures()
    try:
        with pytest.raises(Exception) as raised:
            ckpts.save(1, state, {"step": 1})
            ckpts.wait()
        time.sleep(0.5)  # any straggling callback prints now
    finally:
        remove()
    message = one_line(raised.value)
    assert message.startswith("no space left on device (") and "\n" not in message
    assert "free space and rerun the same command" in message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


def _report(score: float) -> dict:
    return {"name": "t", "wall_seconds": 1.0, "rm": {"val_accuracy": 0.6},
            "evaluation": {"prompts": 2, "samples_per_prompt": 1, "temperature": 1.0, "kl_estimator": "k1"},
            "sft": {"sampled": {"gold_score": score}, "greedy": {"gold_score": score}, "pretrain_loss": 2.0}}


def test_a_report_written_to_a_full_disk_leaves_the_previous_one_whole(small_disk):
    """Before: report.json was left as 4,096 bytes of invalid JSON and a plot as a 0-byte PNG."""
    out = small_disk / "run"
    out.mkdir()
    write_report(out, _report(0.25), {}, ())
    before = tree_digest(out)
    assert set(before) == {"report.json", "report.md", *PLOTS}
    fill(small_disk, leave=4096)
    with pytest.raises(OSError):
        write_report(out, _report(0.75), {"sampled": [{"prompt": "x " * 5000, "sft": "y"}]}, ())
    after = tree_digest(out)
    assert set(after) == set(before)  # no temporary file left beside them
    # each file is whole: the old one, or the new one written in full (report.json fits in 4 KB)
    assert json.loads((out / "report.json").read_text())["sft"]["sampled"]["gold_score"] in (0.25, 0.75)
    for name in PLOTS:
        png = (out / name).read_bytes()
        assert after[name] == before[name] or (png.startswith(b"\x89PNG") and png.endswith(b"IEND\xaeB`\x82")), name
    assert after["report.md"] == before["report.md"]  # it comes after the plots, which did not fit


def _records(path: pathlib.Path) -> list[bytes]:
    """The payloads of a TFRecord file, each checked against its masked CRC32C."""
    from tensorboardX.record_writer import masked_crc32c

    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        payload = data[at + 12:at + 12 + length]
        assert struct.unpack("I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(payload)
        records.append(payload)
        at += 16 + length
    return records


def test_tensorboard_events_are_written_in_the_callers_thread_as_valid_records(tmp_path):
    """The events file replaces tensorboardX's threaded writer: TFRecord framing, Event protos,
    a purge marker for a resumed run, and a failed write raised where it happens."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    events = EventsFile(tmp_path / "tb", purge_step=4)
    events.scalars(5, {"train/loss": 1.5, "perf/steps_per_second": np.float32(2.0)})
    (path,) = (tmp_path / "tb").iterdir()
    parsed = [Event.FromString(r) for r in _records(path)]
    assert parsed[0].file_version == "brain.Event:2"
    assert parsed[1].step == 4 and parsed[1].session_log.status == SessionLog.START
    assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in parsed[2:]] == [
        (5, "train/loss", 1.5), (5, "perf/steps_per_second", 2.0)]
    path.chmod(0o444)
    if os.geteuid() != 0:  # root writes through permission bits
        with pytest.raises(OSError, match="Permission denied"):
            events.scalars(6, {"train/loss": 1.0})
