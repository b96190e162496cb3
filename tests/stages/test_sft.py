"""The SFT stage end to end: learning, exact resume, sharding, bad data, CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, parameters, sharding, steps
from rlhf_jax.config import MeshConfig
from rlhf_jax.data import DataError, SFTBatches, load_tokenizer, to_global
from rlhf_jax.logging import read_metrics
from rlhf_jax.models import LanguageModel
from rlhf_jax.optim import make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.sft import run_sft
from tests.helpers import TINY_MODEL, f32_rtol, forward_sums, tiny_config, write_demonstrations, write_experiment


def _load_params(export_dir):
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    return checkpoint.load_export(export_dir, parameters.abstract(LanguageModel(TINY_MODEL), mesh))


def test_tiny_model_overfits_tiny_dataset(tmp_path):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 8)
    cfg = tiny_config(demos, demos, steps=150, lr=1e-2, save_every=1000)
    run_sft(cfg, tmp_path / "run", show_progress=False)
    metrics = read_metrics(tmp_path / "run" / "sft" / "metrics.jsonl")
    losses = [m["sft/loss"] for m in metrics if "sft/loss" in m]
    assert losses[0] > 3.0  # ~log(150) at init
    assert losses[-1] < 0.05, losses[-5:]
    assert [m["val/loss"] for m in metrics if "val/loss" in m][-1] < 0.05


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_exact(tmp_path):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 64)
    cfg = tiny_config(demos, steps=8, save_every=2, dropout=0.1)  # dropout: RNG must resume too
    straight = run_sft(cfg, tmp_path / "straight", show_progress=False)

    assert run_sft(cfg, tmp_path / "resumed", show_progress=False, stop_after=4) is None
    experiment = write_experiment(cfg, tmp_path / "experiment.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--config", str(experiment),
                             "--workdir", str(tmp_path / "resumed")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed" / "sft" / "export"

    for a, b in zip(jax.tree.leaves(_load_params(straight)), jax.tree.leaves(_load_params(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps_logged = [m["step"] for m in read_metrics(tmp_path / "resumed" / "sft" / "metrics.jsonl") if "sft/loss" in m]
    assert steps_logged == [2, 4, 6, 8]  # one run's worth of lines, none repeated


def _loss_curve(mesh, batches, n_steps):
    model = LanguageModel(TINY_MODEL)
    tx = make_optimizer(tiny_config("x").sft.optim, n_steps)
    state, shardings = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
    step_fn = steps.make_sft_step(model, tx, mesh, shardings, grad_accum_steps=2)
    curve = []
    for i in range(n_steps):
        state, metrics = step_fn(state, to_global(batches.get(i), mesh))
        curve.append(float(metrics["sft/loss"]))
    return np.array(curve)


def test_sharded_training_matches_one_device(tmp_path, eight_devices):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 64)
    tokenizer = load_tokenizer(common.task_files(tmp_path, 0)["tokenizer"])
    batches = SFTBatches(str(demos), tokenizer, tiny_config(demos).sft.data, seed=0,
                         cache_dir=str(tmp_path / "cache"))
    one = _loss_curve(sharding.make_mesh(MeshConfig(1, 1, 1), devices=eight_devices[:1]), batches, 6)
    eight = _loss_curve(sharding.make_mesh(MeshConfig(2, 2, 2)), batches, 6)
    assert one[-1] < one[0]  # it is learning
    # The two curves differ only in how sums are ordered (one device, or the 2x2x2 mesh's
    # all-reduces). A step's loss: the forward pass's sums over 32 positions, the logits'
    # softmax over 168 words, the mean over the batch's 8 x 32 targets, each a reordered f32
    # sum (tests.helpers.f32_rtol). Over 6 small Adam steps (lr 3e-3, gradients clipped to
    # norm 1) each step adds at most as much again to the next loss; a lost shard, a batch
    # read twice or a wrong reduction moves a loss by far more (>1e-3 relative).
    per_step = f32_rtol(*forward_sums(TINY_MODEL, 32), 168, 8 * 32)
    np.testing.assert_allclose(eight, one, rtol=len(one) * per_step)


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "reverse : a b =>", "response": "b a"', 'demos.jsonl:3: .*(JSON|truncated)'),
    ('{"prompt": "reverse : a b =>"}', 'demos.jsonl:3: .*"response"'),
    ('{"prompt": "reverse : a b =>", "response": ""}', 'demos.jsonl:3: field "response" is empty'),
])
def test_bad_jsonl_names_file_and_line_and_writes_no_checkpoint(tmp_path, bad_line, message):
    good = '{"prompt": "reverse : a b =>", "response": "b a"}\n'
    demos = tmp_path / "demos.jsonl"
    demos.write_text(good * 2 + bad_line + "\n" + good)
    with pytest.raises(DataError, match=message):
        run_sft(tiny_config(demos), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "sft").exists()


def test_cli_runs_and_rejects_bad_overrides(tmp_path, capsys):
    from rlhf_jax.cli import main

    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    experiment = write_experiment(tiny_config(demos, steps=2), tmp_path / "exp.py")
    assert main(["sft", "--config", str(experiment), "--workdir", str(tmp_path / "run"),
                 "--sft.optim.learning_rate=1e-4"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["sft"]["optim"]["learning_rate"] == 1e-4
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(experiment), "--workdir", str(tmp_path / "other"), "--sft.no_such_field=1"])
    assert "no_such_field" in capsys.readouterr().err
