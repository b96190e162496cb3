"""``compilation_cache_dir``: a rerun loads its compiled programs from disk instead of compiling
them again. Runs the CLI in subprocesses without the suite's own JAX_COMPILATION_CACHE_DIR."""

import pathlib
import shutil

import pytest

from rlhf_jax.stages import common
from tests.helpers import cli_env, finish_cli, start_cli, tiny_config, write_demonstrations, write_experiment

# the suite's own cache (conftest.py), which would win over the field under test
SUITE_CACHE = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def _sft(experiment: pathlib.Path, workdir: pathlib.Path, *overrides: str) -> None:
    rc, out = finish_cli(start_cli("sft", "--config", str(experiment), "--workdir", str(workdir), *overrides,
                                   env=cli_env(drop=SUITE_CACHE)))
    assert rc == 0, out


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


@pytest.mark.slow
def test_without_the_field_nothing_is_cached(tmp_path):
    task = common.task_files(tmp_path / "task", 0)["manifest"].parent
    demos = write_demonstrations(tmp_path / "demos.jsonl", 64)
    experiment = write_experiment(tiny_config(demos, steps=2, save_every=2), tmp_path / "exp.py")
    workdir = tmp_path / "run"
    shutil.copytree(task, workdir / "data" / "task")
    _sft(experiment, workdir)
    assert not (workdir / "xla_cache").exists()
    assert sorted(p.name for p in workdir.iterdir()) == sorted(["data", "sft", "config.json", ".lock"])


@pytest.mark.parametrize("setting, backend, expected", [
    ("auto", "cpu", None),  # the embedded pipeline compiles in seconds on a CPU
    ("auto", "gpu", "RUN/xla_cache"),
    ("auto", "cuda", "RUN/xla_cache"),
    ("auto", "tpu", "RUN/xla_cache"),
    (None, "gpu", None),
    ("", "tpu", None),
    ("run:cache/xla", "cpu", "RUN/cache/xla"),
    ("/shared/xla", "gpu", "/shared/xla"),
])
def test_where_the_cache_goes(setting, backend, expected):
    got = common.compilation_cache_directory(setting, backend, pathlib.Path("RUN"))
    assert (None if got is None else str(got)) == expected


def test_the_default_is_auto_and_none_turns_it_off():
    from rlhf_jax.config import apply_overrides
    from rlhf_jax.default_config import default_config

    assert default_config().compilation_cache_dir == "auto"
    assert apply_overrides(default_config(), ["--compilation_cache_dir=None"]).compilation_cache_dir is None
