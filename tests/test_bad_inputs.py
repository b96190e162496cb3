"""Inputs that were answered with a traceback, or trained nothing, or wrote where they should
not (issue 30, defects 7 to 9): each is now one line naming the file and line, the field or
the flag, before anything is written. ``docs/fault_tolerance.md`` lists them.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import pytest

from rlhf_jax import parameters, sharding
from rlhf_jax.cli import main
from rlhf_jax.config import ConfigError, MeshConfig
from rlhf_jax.data import DataError, iter_records
from rlhf_jax.models import LanguageModel
from rlhf_jax.models.hf import export_hf
from rlhf_jax.models.hf_config import HFError
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import Interrupted, Preemption
from tests.helpers import (TINY_MODEL, REPO, cli_env, rm_config, tiny_config, write_demonstrations,
                           write_experiment)


@pytest.mark.parametrize("kind, line, said", [
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 2147483648]}',
     'field "ranks"[1] is 2147483648; ranks are 0 (best) to 2147483647'),
    ("demonstrations", '{"prompt": "\\ud800", "response": "a"}',
     "field \"prompt\" holds a lone surrogate '\\ud800' at character 0 (not valid Unicode text)"),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b\\udfff"], "ranks": [0, 1]}',
     'field "responses"[1] holds a lone surrogate'),
    ("text", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("prompts", '{"prompt": "\\u200b\\u200b\\ufeff"}', 'field "prompt" is empty (only invisible characters)'),
])
def test_records_that_crashed_or_encoded_to_nothing_name_their_line(tmp_path, kind, line, said):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "fine", "response": "ok", "text": "ok", "responses": ["a", "b"], "ranks": [0, 1]}\n'
                    + line + "\n")
    with pytest.raises(DataError) as refused:
        list(iter_records(path, kind))
    assert str(refused.value).startswith(f"{path}:2: ") and said in str(refused.value)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> pathlib.Path:
    return common.task_files(tmp_path_factory.mktemp("task"), 0)["manifest"].parent


def test_comparisons_whose_responses_are_all_identical_are_refused(tmp_path, task_dir, capsys):
    """Before: an RM trained on them with zero gradient and exported at accuracy 0.5."""
    path = tmp_path / "same.jsonl"
    path.write_text('{"prompt": "p", "chosen": "red cat", "rejected": "red cat"}\n' * 16)
    workdir = tmp_path / "run"
    shutil.copytree(task_dir, workdir / "data" / "task")
    cfg = rm_config(tiny_config(write_demonstrations(tmp_path / "demos.jsonl", 8)), path, batch_size=8)
    assert main(["rm", "--config", str(write_experiment(cfg, tmp_path / "exp.py")), "--workdir", str(workdir)]) == 2
    assert ("same.jsonl: every pair with different ranks compares identical responses (16 comparisons, 16 ranked "
            "pairs, 0 of them between responses that tokenise differently)" in capsys.readouterr().err)
    assert not (workdir / "rm").exists() and not (workdir / "config.json").exists()


def test_a_missing_safetensors_shard_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    mesh = sharding.make_mesh(MeshConfig(data=-1))
    params, _ = parameters.create(LanguageModel(TINY_MODEL), mesh, jax.random.PRNGKey(0))
    hf = export_hf(params, TINY_MODEL, tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    save_file({n: tensors[n] for n in names[:3]}, hf / "model-00001-of-00002.safetensors")  # the second is lost
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: shard for shard, members in shards.items() for n in members}}))
    with pytest.raises(HFError, match=r"model.safetensors.index.json: names the shard model-00002-of-00002."
                                      r"safetensors, which is missing \(1 of 2 shards missing\)"):
        parameters.load(str(hf), LanguageModel(TINY_MODEL), mesh, "model.hf_path")


EXPERIMENTS = {  # file body after the import -> what the one error line says
    "raises": ("def get_config():\n    settings = {}\n    return settings['missing']\n",
               ":5: KeyError: 'missing'"),
    "typo": ("def get_config():\n    return Config(sft=SFTConfig(max_step=5))\n",
             ":4: TypeError: SFTConfig.__init__() got an unexpected keyword argument 'max_step'; did you mean "
             "'max_steps'?"),
    "syntax": ("def get_config(:\n    return Config()\n", ":3: syntax error: "),
    "wrong-type": ("def get_config():\n    return Config(sft=SFTConfig(max_steps=10.0))\n",
                   ' (get_config()): invalid config: wrong value type for field "sft.max_steps"'),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_a_config_file_that_fails_is_one_line_naming_file_and_line(tmp_path, capsys, name):
    """Before: a traceback; a wrong type was saved to config.json, which every later command
    in the run directory then refused."""
    body, said = EXPERIMENTS[name]
    path = tmp_path / f"{name}.py"
    path.write_text("from rlhf_jax.config import *\n\n" + body)
    assert main(["sft", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"rlhf-jax sft: error: {path}{said}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, said", [
    (["sft", "--sft.optim.learning_rate=nan"], "sft.optim.learning_rate must be a finite number, got nan"),
    (["ppo", "--ppo.policy_optim.learning_rate=inf"], "ppo.policy_optim.learning_rate must be a finite number"),
    (["sft", "--model.n_layers=10000", "--model.d_model=4096", "--model.n_heads=32", "--model.n_kv_heads=8",
      "--model.d_ff=16384"], "parameters (model.n_layers=10000, d_model=4096, d_ff=16384, vocab_size=168) need "
                             "at least"),
    (["ppo", "--stage", "../../elsewhere"], "--stage '../../elsewhere': a directory name inside the run directory"),
    (["sample", "--export", "run:sft/export", "--prompt", "fine", "--prompt", ""],
     "--prompt number 2 ('') is empty"),
    (["sample", "--export", "run:sft/export", "--prompt", "\u200b"], "--prompt number 1 ('\\u200b') is empty"),
])
def test_a_field_or_flag_that_cannot_work_is_refused_before_anything_is_written(tmp_path, capsys, argv, said):
    """NaN/Inf learning rates passed validation; a 2.4-trillion-parameter model reached XLA
    (n_layers=10000 at the default width ran out of memory after 29 s, config.json and sft/
    written); --stage wrote outside the run directory; an empty --prompt named a temporary file."""
    workdir = tmp_path / "nested" / "run"
    assert main([*argv, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and tempfile.gettempdir() + "/tmp" not in err, err
    assert sorted(p.name for p in workdir.rglob("*")) in ([], [".lock"]) and not (tmp_path / "elsewhere").exists()


def test_a_commands_help_lists_its_flags_and_its_config_fields(capsys):
    """Before: `rlhf-jax sft --help` printed the general help only."""
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf-jax sft [--config CONFIG] [--workdir WORKDIR] [--stop-after-steps")
    assert "--sft.optim.learning_rate=0.0005" in out and "--sft.data.train_path='task:demonstrations'" in out
    assert "--ppo." not in out and "--export" not in out
    assert main(["ppo", "-h"]) == 0 and "--stage: " in capsys.readouterr().out


def test_ctrl_c_prints_one_line_and_the_rerun_resumes(tmp_path):
    """Before: 141 lines of tracebacks. Ctrl-C reaches the whole process group."""
    demos = write_demonstrations(tmp_path / "demos.jsonl", 32)
    cfg = tiny_config(demos, steps=400, save_every=2)
    command = [sys.executable, "-m", "rlhf_jax.cli", "sft", "--config", str(write_experiment(cfg, tmp_path / "x.py")),
               "--workdir", str(tmp_path / "run")]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not list((tmp_path / "run" / "sft" / "checkpoints").glob("[0-9]*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130
        log.seek(0)
        out = log.read()
    assert "Traceback" not in out, out[-3000:]
    assert re.findall(r"rlhf-jax sft: [^\n]*", out) == [  # (the progress bar may share its line)
        "rlhf-jax sft: interrupted (Ctrl-C); rerun the same command to resume from the last finished checkpoint"]
    assert main(["sft", "--workdir", str(tmp_path / "run"), "--stop-after-steps=1"]) == 0  # it resumes


def test_sigterm_during_the_evaluation_stops_at_once():
    """Before: the pipeline's SIGTERM handler only set a flag, which nothing read until the
    evaluation (minutes) had finished; a preemption's grace period is shorter."""
    started = time.monotonic()
    with Preemption() as preemption:
        with pytest.raises(Interrupted, match="interrupted during the evaluation; rerun the same command"):
            with preemption.raising("during the evaluation"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
    assert time.monotonic() - started < 10
    with Preemption() as preemption:  # one that arrived before the evaluation began stops it too
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted):
            with preemption.raising("during the evaluation"):
                pass


def test_a_config_error_names_a_misspelt_field_only_for_config_blocks():
    from rlhf_jax.config.checks import _field_hint

    assert _field_hint(TypeError("SFTConfig.__init__() got an unexpected keyword argument 'epoch'")) == \
        "; did you mean 'epochs'?"
    assert _field_hint(TypeError("Path.__init__() got an unexpected keyword argument 'x'")) == ""
    with pytest.raises(ConfigError, match="must be a finite number"):
        tiny_config(pathlib.Path("x"), lr=float("nan")).validate()
