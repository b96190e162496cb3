"""sweep: statistics over seeds and the targets, on hand-made reports (no pipeline run)."""

import pytest

from rlhf_jax import sweep


def _report(rm, sft, ppo, win, ppo_reg, ptx_reg):
    return {"rm": {"val_accuracy": rm}, "sft": {"gold_score": sft},
            "ppo": {"gold_score": ppo, "win_rate_vs_sft": win, "pretrain_loss_regression": ppo_reg},
            "ppo_ptx": {"gold_score": sft, "win_rate_vs_sft": 0.5, "pretrain_loss_regression": ptx_reg},
            "wall_seconds": 100.0, "name": "x"}


def test_summary_statistics_and_targets_per_seed():
    reports = {0: _report(0.7, 0.6, 0.65, 0.6, 0.1, -0.1), 1: _report(0.5, 0.6, 0.55, 0.4, 0.1, 0.2)}
    summary = sweep.summarize(reports)
    rm = summary["stats"]["rm.val_accuracy"]
    assert rm["values"] == [0.7, 0.5]
    assert rm["mean"] == pytest.approx(0.6)
    assert rm["std"] == pytest.approx(0.1414213562, rel=1e-6)  # sample std, n - 1
    assert "name" not in summary["stats"]
    assert summary["targets"][0] == {"rm_above_chance": True, "ppo_beats_sft": True, "ptx_smaller_tax": True}
    assert summary["targets"][1] == {"rm_above_chance": False, "ppo_beats_sft": False, "ptx_smaller_tax": False}
    table = sweep.markdown(summary, "x")
    assert "| RM held-out accuracy | 0.600 ± 0.141 | 0.700 | 0.500 |" in table
    assert "| ppo_beats_sft | met | not met |" in table


def test_one_seed_has_zero_spread():
    summary = sweep.summarize({3: _report(0.7, 0.6, 0.65, 0.6, 0.1, -0.1)})
    assert summary["stats"]["ppo.gold_score"] == {"mean": 0.65, "std": 0.0, "values": [0.65]}
