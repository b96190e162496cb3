"""Multi-host JAX: when ``maybe_initialize`` joins processes, and a real two-process run
(2 processes x 4 CPU devices over 127.0.0.1) that must equal one process with 8 devices."""

import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, parameters, sharding, steps
from rlhf_jax.config import Config, ConfigError, DistributedConfig, MeshConfig, OptimConfig, apply_overrides
from rlhf_jax.distributed import detect, initialize_kwargs, maybe_initialize
from rlhf_jax.logging import read_metrics
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.rm import run_rm
from rlhf_jax.stages.sft import run_sft
from tests.helpers import (TINY_MODEL, f32_rtol, forward_sums, rm_config, tiny_config, write_demonstrations,
                           write_experiment, write_marker_comparisons)

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
REPO = pathlib.Path(__file__).parents[1]


# ---- when to initialise -------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, "env"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", "TPU_WORKER_ID": "2"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, None),  # a single-host slice
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2", "MEGASCALE_NUM_SLICES": "2"}, "tpu"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, None),  # an interactive one-task allocation is not multi-host
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
])
def test_detect_reads_the_environment(env, expected):
    assert detect(env, on_tpu_vm=False) == expected


def test_detect_on_a_tpu_vm_unless_metadata_is_off():
    assert detect({}, on_tpu_vm=True) == "tpu"
    assert detect({"TPU_SKIP_MDS_QUERY": "1"}, on_tpu_vm=True) is None


def test_initialize_arguments_config_first_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert initialize_kwargs(DistributedConfig(), env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, "local_device_ids": None}
    cfg = DistributedConfig(mode="on", coordinator_address="h:1", num_processes=2, process_id=0,
                            local_device_ids="0,1")
    assert initialize_kwargs(cfg, env) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": [0, 1]}
    # nothing given: JAX's own cluster detection (TPU metadata, SLURM) fills everything in
    assert initialize_kwargs(DistributedConfig(mode="on"), {}) == {
        "coordinator_address": None, "num_processes": None, "process_id": None, "local_device_ids": None}


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
])
def test_inconsistent_environment_is_a_clear_error(env, message):
    with pytest.raises(ConfigError, match=message):
        maybe_initialize(DistributedConfig(), env)
    with pytest.raises(ConfigError, match="local_device_ids"):
        initialize_kwargs(DistributedConfig(local_device_ids="0;1"), {})


def test_single_process_is_left_alone_and_late_initialisation_refused(eight_devices):
    # eight_devices: this process's backend exists, as in any test
    assert maybe_initialize(DistributedConfig(), {}).initialized is False
    assert maybe_initialize(DistributedConfig(mode="off"), {"JAX_COORDINATOR_ADDRESS": "h:1"}).initialized is False
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(ConfigError, match="before JAX touches a device"):
        maybe_initialize(DistributedConfig(), env)
    assert not jax.distributed.is_initialized()


def test_cli_initialises_after_resolving_the_config(eight_devices, tmp_path, monkeypatch, capsys):
    """The CLI asks before running anything: here JAX is already up, so it refuses (exit 2)
    and writes nothing."""
    from rlhf_jax.cli import main

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert main(["sft", "--workdir", str(tmp_path / "run")]) == 2
    assert "before JAX touches a device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert apply_overrides(Config(), ["--distributed.mode=off"]).distributed.mode == "off"


# ---- two real processes ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MULTI_HOST_VARIABLES = {"XLA_FLAGS", "JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                        "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"}


def launch(argv_for, n: int = 2, devices: int = 4, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """``n`` JAX processes with ``devices`` CPU devices each, joined over 127.0.0.1."""
    port = free_port()
    procs = []
    for p in range(n):
        # inherited: the compilation cache conftest.py sets up, so a relaunch loads its programs
        env = {k: v for k, v in os.environ.items() if k not in MULTI_HOST_VARIABLES}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                   JAX_PROCESS_ID=str(p), PYTHONPATH=str(REPO), **(extra_env or {}))
        # output to a file, not a pipe: nobody reads a pipe while we poll, and a full one blocks
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(argv_for(p), env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        proc.log = log
        procs.append(proc)
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """Waits for every process; if one fails or the time runs out, kills the rest (a process
    whose peer died would otherwise wait for it until JAX's heartbeat timeout)."""
    deadline, outputs = time.monotonic() + timeout, [None] * len(procs)
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for i, p in enumerate(procs):
            p.wait()
            p.log.seek(0)
            outputs[i] = p.log.read()
            p.log.close()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outputs


# One block: a whole transformer still, at half the compile time of two (compiling is most
# of what these tests cost on a 2-core machine).
MODEL = dataclasses.replace(TINY_MODEL, n_layers=1)
STEPS, BATCH, LENGTH, LR, ADAM_EPS = 4, 8, 32, 3e-3, 1e-3

# The two runs differ only in the order partial sums are added: across processes gloo
# all-reduces them, within one process XLA does, and float32 addition is not associative
# (tests.helpers.f32_rtol: (n - 1) eps per reordered sum of n terms).
# - A step's loss or reward: the forward pass's sums, the 168-word softmax and the mean over
#   the batch's targets; over STEPS small Adam steps each adds at most as much again.
#   Metrics near 0 (a margin, a reward mean at the start) are sums of O(1) terms: the same
#   bound, absolute.
_STEP_RTOL = f32_rtol(*forward_sums(MODEL, LENGTH), TINY_MODEL.vocab_size, BATCH * LENGTH)
METRIC_RTOL = METRIC_ATOL = STEPS * _STEP_RTOL
# - Weights: a gradient entry sums the forward and backward chains and the batch's tokens,
#   with terms of at most 1 (gradients are clipped to global norm 1). Adam's step
#   lr * m / (sqrt(v) + eps) moves by at most lr / eps per unit of gradient (eps raised to
#   1e-3 below, so the step is smooth), over STEPS steps. That bound (~2e-3) is too loose
#   to see a wrong reduction, which the metrics catch; it still catches what the weights
#   comparison is for, a shard lost, zeroed or misplaced by the two processes' checkpoint and
#   export writes (it moves a weight by its own size, ~0.02 at init).
_GRAD_RTOL = f32_rtol(*forward_sums(MODEL, LENGTH), *forward_sums(MODEL, LENGTH), TINY_MODEL.vocab_size,
                      BATCH * LENGTH)
PARAM_ATOL = STEPS * (LR / ADAM_EPS) * _GRAD_RTOL



def _cfg(tmp_path):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 48)
    # fsdp 4 x tensor 2: the fsdp axis spans both processes, so every parameter is split
    # between them and each process writes only its half of each checkpoint. Dropout: each
    # process must draw its shards' part of the same masks.
    cfg = tiny_config(demos, steps=STEPS, batch_size=BATCH, mesh=MeshConfig(data=1, fsdp=-1, tensor=2),
                      save_every=2, dropout=0.1, model=MODEL)
    return dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, optim=ADAM))


# Adam with eps 1e-3, so its step is smooth in the gradient. With the default 1e-8, a weight
# whose gradient cancels over the batch to ~1e-9 (the reward head starts at zero: many do)
# takes a full lr-sized step whose sign the summation order decides, and the two runs could
# only be compared to ~lr.
ADAM = OptimConfig(learning_rate=LR, eps=ADAM_EPS)


def _with_task_files(tmp_path: pathlib.Path, *workdirs: pathlib.Path) -> None:
    """The embedded task's files (its tokenizer is the one these runs use), written once into
    ``tmp_path`` and copied: otherwise every process of every run generates the whole task."""
    source = common.task_files(tmp_path, 0)["manifest"].parent
    for workdir in workdirs:
        shutil.copytree(source, workdir / "data" / "task")


def _params(export_dir, model):
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    return checkpoint.load_export(export_dir, parameters.abstract(model, mesh))


def _assert_same_params(a_tree, b_tree):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(a_tree)[0], jax.tree.leaves(b_tree)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAM_ATOL,
                                   err_msg=jax.tree_util.keystr(path))


def _run_both(tmp_path, cfg, command: str, reference) -> tuple[pathlib.Path, pathlib.Path]:
    """``rlhf-jax <command>`` in two processes (4 devices each) sharing one run directory,
    and ``reference(workdir)`` here (one process, 8 devices) at the same time; compares
    metrics.jsonl and the exports."""
    experiment = write_experiment(cfg, tmp_path / "experiment.py")
    two, one = tmp_path / "two", tmp_path / "one"
    _with_task_files(tmp_path, two, one)
    procs = launch(lambda p: [sys.executable, str(WORKER), str(experiment), str(two), command])
    reference(one)
    for p, out in enumerate(wait_all(procs)):
        assert f"process {p} of 2: ok (4 local devices)" in out, out[-2000:]
    two_rows = read_metrics(two / command / "metrics.jsonl")
    one_rows = read_metrics(one / command / "metrics.jsonl")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]
    for a, b in zip(two_rows, one_rows):
        keys = sorted(k for k in a if not k.startswith("perf/"))
        assert keys == sorted(k for k in b if not k.startswith("perf/"))
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=METRIC_RTOL,
                                   atol=METRIC_ATOL, err_msg=f"{command} step {a['step']}: {keys}")
    two_meta, one_meta = (checkpoint.read_export_meta(w / command / "export") for w in (two, one))
    assert two_meta.keys() == one_meta.keys()
    for key, value in two_meta.items():  # floats: the RM's normalisation offset
        assert value == (pytest.approx(one_meta[key], rel=METRIC_RTOL) if isinstance(value, float)
                         else one_meta[key]), key
    return two, one


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_sft_like_one_and_write_one_checkpoint(tmp_path, eight_devices):
    cfg = _cfg(tmp_path)
    two, one = _run_both(tmp_path, cfg, "sft", lambda w: run_sft(cfg, w, show_progress=False))
    model = LanguageModel(MODEL)
    _assert_same_params(_params(two / "sft" / "export", model), _params(one / "sft" / "export", model))

    # the checkpoint both processes wrote restores here, onto another mesh, and equals ours
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    state, _ = steps.create_train_state(model, make_optimizer(cfg.sft.optim, 4), mesh, jax.random.PRNGKey(0))
    ckpts = [checkpoint.StageCheckpoints(d / "sft" / "checkpoints", cfg.sft.checkpoint) for d in (two, one)]
    assert [c.manager.all_steps() for c in ckpts] == [[2, 4], [2, 4]]
    (two_state, two_meta), (one_state, one_meta) = (c.restore(state) for c in ckpts)
    assert two_meta == one_meta  # step and config
    _assert_same_params(two_state, one_state)  # params, Adam moments, step, RNG


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_the_reward_model_like_one(tmp_path, eight_devices):
    """Starts from an SFT export, validates each epoch and normalises on demonstrations:
    restores, evaluation sums and gathered rewards all cross processes."""
    cfg = _cfg(tmp_path)
    comparisons = write_marker_comparisons(tmp_path / "comparisons.jsonl", 24)
    cfg = rm_config(cfg, comparisons, comparisons, steps=3, init_from=str(tmp_path / "sft" / "export"),
                    normalize_path=tmp_path / "demos.jsonl")
    cfg = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, optim=ADAM))
    run_sft(dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, max_steps=1)), tmp_path, show_progress=False)
    two, one = _run_both(tmp_path, cfg, "rm", lambda w: run_rm(cfg, w, show_progress=False))
    model = ScalarModel(MODEL)
    _assert_same_params(_params(two / "rm" / "export", model), _params(one / "rm" / "export", model))


def _metric_steps(path: pathlib.Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(path)]
    except (OSError, ValueError):  # not there yet, or a line half written
        return []


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_rerun_is_exact(tmp_path, eight_devices):
    """A preemption notice reaches one host: every process stops at the same step, saves one
    checkpoint together and exits 0; rerunning finishes with exactly the params of an
    uninterrupted two-process run (same processes, same reduction order: no tolerance)."""
    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(
        cfg.sft, max_steps=16, checkpoint=dataclasses.replace(cfg.sft.checkpoint, save_every=1000)))
    experiment = write_experiment(cfg, tmp_path / "experiment.py")
    _with_task_files(tmp_path, tmp_path / "straight", tmp_path / "stopped")
    argv = lambda workdir: lambda p: [sys.executable, str(WORKER), str(experiment), str(workdir), "sft"]  # noqa: E731
    straight = launch(argv(tmp_path / "straight"))
    stopped = launch(argv(tmp_path / "stopped"))
    deadline = time.monotonic() + 180
    while not _metric_steps(tmp_path / "stopped" / "sft" / "metrics.jsonl") and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped[1].send_signal(signal.SIGTERM)  # process 1 only; JAX tells process 0
    for out in wait_all(stopped):
        assert "sft: stopped early; rerun to resume" in out, out[-2000:]
    ckpts = checkpoint.StageCheckpoints(tmp_path / "stopped" / "sft" / "checkpoints", cfg.sft.checkpoint)
    (stop_step,) = ckpts.manager.all_steps()
    assert 2 <= stop_step < 16
    assert max(_metric_steps(tmp_path / "stopped" / "sft" / "metrics.jsonl")) == stop_step

    wait_all(launch(argv(tmp_path / "stopped")))  # the same command: resumes, finishes
    wait_all(straight)
    model = LanguageModel(MODEL)
    for a, b in zip(jax.tree.leaves(_params(tmp_path / "stopped" / "sft" / "export", model)),
                    jax.tree.leaves(_params(tmp_path / "straight" / "sft" / "export", model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every log_every=2 step, plus the stop step (a save point logs the metrics it checks)
    assert _metric_steps(tmp_path / "stopped" / "sft" / "metrics.jsonl") == sorted({*range(2, 17, 2), stop_step})
