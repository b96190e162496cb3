"""The PPO stage: a programmatic reward rises while KL stays finite; PPO-ptx; resume."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import DataConfig, GenerationConfig, OptimConfig, PPOConfig, SamplingConfig
from rlhf_jax.logging import read_metrics
from rlhf_jax.stages.ppo import run_ppo
from rlhf_jax.stages.sft import run_sft
from tests.helpers import tiny_config, write_demonstrations

TARGET = 7  # the token whose count in the response is the reward


def count_target(params, samples):
    """A programmatic reward: how often TARGET occurs in the response."""
    return jnp.sum((samples.tokens == TARGET) & samples.mask, axis=1).astype(jnp.float32)


def _ppo_cfg(demos, **changes):
    cfg = tiny_config(demos, steps=1)
    ppo = dataclasses.replace(PPOConfig(
        prompts=DataConfig(train_path="task:prompts", val_path=None, batch_size=32, max_len=16),
        pretrain=DataConfig(train_path="task:pretrain", val_path=None, batch_size=8, max_len=32),
        minibatch_size=16, epochs=2, iterations=30,
        policy_optim=OptimConfig(learning_rate=3e-3, final_lr_fraction=1.0),
        value_optim=OptimConfig(learning_rate=3e-3, final_lr_fraction=1.0),
        kl_coef=0.02, missing_eos_penalty=0.0, eval_every=1000), **changes)
    return dataclasses.replace(cfg, ppo=ppo, generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=8)))


@pytest.mark.slow
def test_ppo_raises_a_programmatic_reward_with_finite_kl(tmp_path):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    cfg = _ppo_cfg(demos)
    run_sft(cfg, tmp_path / "run", show_progress=False)  # one step: a near-uniform policy
    run_ppo(cfg, tmp_path / "run", show_progress=False, reward_fn=count_target)
    metrics = [m for m in read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl") if "ppo/score" in m]
    scores = [m["ppo/score"] for m in metrics]
    kls = [m["ppo/kl_to_ref"] for m in metrics]
    # uniform over 152 tokens: ~8/152 = 0.05 targets per response at the start
    assert np.mean(scores[:2]) < 0.3
    assert np.mean(scores[-3:]) > np.mean(scores[:2]) + 1.0, scores
    assert all(math.isfinite(k) for k in kls) and kls[-1] > 0
    # phase timing is opt-in (ppo.time_phases): it waits on the device between phases
    assert not any(key.startswith("time/") for m in metrics for key in m)
    assert all(m["perf/steps_per_second"] > 0 for m in metrics)


def test_ppo_ptx_runs_and_its_coefficient_shows(tmp_path):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    cfg = _ppo_cfg(demos, iterations=2, ptx_coef=27.8, time_phases=True)
    run_sft(cfg, tmp_path / "run", show_progress=False)
    export = run_ppo(cfg, tmp_path / "run", stage="ppo_ptx", show_progress=False, reward_fn=count_target)
    assert export == tmp_path / "run" / "ppo_ptx" / "export" and (export / "export.json").exists()
    assert not (tmp_path / "run" / "ppo").exists()  # ``stage`` names the directory
    metrics = [m for m in read_metrics(tmp_path / "run" / "ppo_ptx" / "metrics.jsonl") if "ptx/loss" in m]
    assert len(metrics) == 2
    np.testing.assert_allclose(metrics[0]["ppo/objective/ptx"], 27.8 * metrics[0]["ptx/loss"], rtol=1e-5)
    assert {"time/rollout_s", "time/scoring_s", "time/update_s", "ppo/clipfrac", "ppo/approx_kl",
            "value/explained_variance", "ppo/eos_rate", "ppo/response_length", "ppo/entropy"} <= set(metrics[0])
