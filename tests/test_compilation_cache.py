"""``compilation_cache_dir``: a rerun loads its compiled programs from disk instead of compiling
them again. Runs the CLI in subprocesses without the suite's own JAX_COMPILATION_CACHE_DIR."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from rlhf_jax.stages import common
from tests.helpers import tiny_config, write_demonstrations, write_experiment

REPO = pathlib.Path(__file__).parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                         "JAX_PROCESS_ID")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    return env


def _sft(experiment: pathlib.Path, workdir: pathlib.Path, *overrides: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--config", str(experiment),
                           "--workdir", str(workdir), *overrides], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _entries(cache: pathlib.Path) -> set[str]:
    return {p.name for p in cache.iterdir()} if cache.exists() else set()


@pytest.mark.slow
def test_a_rerun_compiles_nothing_new_and_run_paths_live_in_the_run_directory(tmp_path):
    task = common.task_files(tmp_path / "task", 0)["manifest"].parent
    demos = write_demonstrations(tmp_path / "demos.jsonl", 64)
    experiment = write_experiment(tiny_config(demos, steps=2, save_every=2), tmp_path / "exp.py")
    first, second = tmp_path / "first", tmp_path / "second"
    for workdir in (first, second):
        shutil.copytree(task, workdir / "data" / "task")

    _sft(experiment, first, "--compilation_cache_dir=run:xla_cache")
    cache = first / "xla_cache"
    written = _entries(cache)
    assert written, "the first run cached nothing"
    # the same stage again (its outputs removed, the cache kept): every program is a hit
    shutil.rmtree(first / "sft")
    _sft(experiment, first, "--compilation_cache_dir=run:xla_cache")
    assert _entries(cache) == written
    # another run directory sharing an absolute cache directory
    _sft(experiment, second, f"--compilation_cache_dir={cache}")
    assert _entries(cache) == written and not (second / "xla_cache").exists()


def test_without_the_field_nothing_is_cached(tmp_path):
    task = common.task_files(tmp_path / "task", 0)["manifest"].parent
    demos = write_demonstrations(tmp_path / "demos.jsonl", 64)
    experiment = write_experiment(tiny_config(demos, steps=2, save_every=2), tmp_path / "exp.py")
    workdir = tmp_path / "run"
    shutil.copytree(task, workdir / "data" / "task")
    _sft(experiment, workdir)
    assert not (workdir / "xla_cache").exists()
    assert sorted(p.name for p in workdir.iterdir()) == sorted(["data", "sft", "config.json", ".lock"])
