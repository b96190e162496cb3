"""The methods after the RM, each two steps on a tiny model: DPO (offline, from
comparisons), RLOO and GRPO (online), best-of-n; resume; the CLI's table-driven commands."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import (BestOfNConfig, CheckpointConfig, DataConfig, DPOConfig, GenerationConfig, GRPOConfig,
                             OptimConfig, RLOOConfig, SamplingConfig)
from rlhf_jax.logging import read_metrics
from rlhf_jax.stages.sft import run_sft
from rlhf_jax.stages.table import BY_NAME, METHODS, RunOptions
from tests.helpers import finish_cli, start_cli, tiny_config, write_demonstrations, write_experiment, \
    write_marker_comparisons

TARGET = 7  # the token whose count in the response is the reward


def count_target(params, samples):
    """A programmatic reward: how often TARGET occurs in the response."""
    return jnp.sum((samples.tokens == TARGET) & samples.mask, axis=1).astype(jnp.float32)


def methods_config(tmp_path, **online):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    comparisons = write_marker_comparisons(tmp_path / "comparisons.jsonl", 32)
    cfg = tiny_config(demos, steps=1)
    # task prompts are at most 22 tokens: a cut prompt is one the gold scorer cannot read
    prompts = DataConfig(train_path="task:prompts", val_path="task:prompts_val", batch_size=8, max_len=24)
    small = dict(prompts=prompts, pretrain=DataConfig(train_path="task:pretrain", val_path=None, batch_size=8,
                                                      max_len=32),
                 minibatch_size=16, iterations=2, eval_every=2, checkpoint=CheckpointConfig(save_every=1),
                 policy_optim=OptimConfig(learning_rate=1e-3, final_lr_fraction=1.0), **online)
    return dataclasses.replace(
        cfg, generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=8),
                                         prompts=dataclasses.replace(prompts, batch_size=32)),
        rloo=RLOOConfig(**small), grpo=GRPOConfig(**small),
        dpo=DPOConfig(data=DataConfig(train_path=str(comparisons), val_path=str(comparisons), batch_size=8,
                                      max_len=32),
                      k_max=5, max_steps=2, log_every=1, eval_every=2, optim=OptimConfig(learning_rate=1e-3)),
        best_of_n=BestOfNConfig(n=3, reward_init="gold"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a one-step SFT export: every method's start and reference."""
    tmp_path = tmp_path_factory.mktemp("methods")
    cfg = methods_config(tmp_path)
    run_sft(cfg, tmp_path / "run", show_progress=False)
    return cfg, tmp_path / "run"


def test_dpo_starts_at_log_2_and_exports_the_policy(run_dir):
    """Policy == reference at the first step (same SFT export, no dropout): every log-ratio is
    0 and the sigmoid loss is log 2, which only holds if the reference's log-probs are the
    same summed response log-probs as the policy's."""
    cfg, workdir = run_dir
    export = BY_NAME["dpo"].run(cfg, workdir, RunOptions(show_progress=False))
    assert (export / "export.json").exists()
    rows = read_metrics(workdir / "dpo" / "metrics.jsonl")
    first = next(r for r in rows if "dpo/loss" in r)
    # the two passes are compiled apart: summed f32 log-probs of ~10 tokens of |log p| ~ 5
    # (~50) round differently by up to ~50 * 6e-8 = 3e-6; beta 0.1 makes the loss's share 1e-7
    assert abs(first["dpo/log_ratio_mean"]) < 1e-5 and first["dpo/prompts_with_pairs"] == 8
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    second = [r for r in rows if "dpo/loss" in r][1]
    assert second["dpo/loss"] < math.log(2)  # one step moved the policy the right way on these pairs
    assert any("val/dpo_accuracy" in r for r in rows)


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_group_methods_run_two_iterations_and_export(run_dir, method):
    cfg, workdir = run_dir
    export = BY_NAME[method].run(cfg, workdir, RunOptions(show_progress=False, reward_fn=count_target))
    assert (export / "export.json").exists()
    assert json.loads((export / "export.json").read_text())["group_size"] == 4
    rows = [r for r in read_metrics(workdir / method / "metrics.jsonl") if f"{method}/score" in r]
    assert len(rows) == 2
    for key in ("kl_to_ref", "group_reward_std", "policy_loss", "clipfrac", "eos_rate", "response_length"):
        assert all(math.isfinite(r[f"{method}/{key}"]) for r in rows), key
    # the first batch is sampled from the reference itself: KL 0 up to the KV cache's rounding
    assert abs(rows[0][f"{method}/kl_to_ref"]) < 1e-3
    evals = [r for r in read_metrics(workdir / method / "metrics.jsonl") if "eval/kl_to_ref" in r]
    assert [r["step"] for r in evals] == [0, 2]


def test_an_online_method_resumes_where_it_stopped(tmp_path):
    cfg = methods_config(tmp_path)
    run_sft(cfg, tmp_path / "run", show_progress=False)
    grpo = BY_NAME["grpo"]
    assert grpo.run(cfg, tmp_path / "run", RunOptions(show_progress=False, stop_after=1,
                                                      reward_fn=count_target)) is None
    assert grpo.run(cfg, tmp_path / "run", RunOptions(show_progress=False, reward_fn=count_target)) is not None
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "grpo" / "metrics.jsonl") if "grpo/score" in r]
    assert steps == [1, 2]


def test_best_of_n_keeps_the_highest_scoring_of_n_from_the_cli(run_dir, tmp_path):
    """``rlhf-jax best-of-n --reward gold``: every pick is the gold-best of its 3 candidates."""
    cfg, workdir = run_dir
    cfg = dataclasses.replace(cfg, best_of_n=dataclasses.replace(cfg.best_of_n, reward_init="run:rm/export"))
    experiment = write_experiment(cfg, tmp_path / "experiment.py")
    code, out = finish_cli(start_cli("best-of-n", "--config", str(experiment), "--workdir", str(workdir),
                                     "--reward", "gold"))
    assert code == 0, out[-3000:]
    rows = [json.loads(line) for line in (workdir / "best_of_n" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 200  # every held-out prompt
    for row in rows:
        assert len(row["responses"]) == len(row["scores"]) == 3
        assert row["score"] == max(row["scores"]) == row["scores"][row["chosen"]]
        assert row["response"] == row["responses"][row["chosen"]]
    assert np.mean([r["score"] for r in rows]) > np.mean([np.mean(r["scores"]) for r in rows])


def test_the_stage_table_gives_the_cli_its_commands_and_refuses_unknown_methods():
    from rlhf_jax.cli import STAGES
    from rlhf_jax.config import ConfigError
    from rlhf_jax.stages.table import check_methods

    assert {"dpo", "rloo", "grpo", "best-of-n", "ppo"} <= set(STAGES) and "ppo_ptx" not in STAGES
    assert set(METHODS) == {"ppo", "ppo_ptx", "ppo_gold", "rloo", "grpo", "dpo", "best_of_n"}
    with pytest.raises(ConfigError, match=r"pipeline.methods=.*\['sft'\] not a method"):
        check_methods(("ppo", "sft"))
