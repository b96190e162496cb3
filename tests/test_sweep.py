"""sweep: statistics over seeds and the targets, on hand-made reports (no pipeline run)."""

import pytest

from rlhf_jax import sweep


def _policy(gold, win=None, **rates):
    out = {"gold_score": gold, "constraint_violation": 0.3, "hallucination": 0.3, "offensive_respectful": 0.1,
           "rambling": 0.1, **rates}
    if win is not None:
        out["win_rate_vs_sft"] = win
    return {"sampled": out, "greedy": dict(out)}


def _report(rm, sft, ppo, win, ppo_reg, ptx_reg, ptx_win=0.5, best=(0.7, 0.6)):
    return {"rm": {"val_accuracy": rm, "best_of_n_gold": best[0], "best_of_n_random_gold": best[1]},
            "sft": _policy(sft),
            "ppo": {**_policy(ppo, win, hallucination=0.2, constraint_violation=0.2, offensive_respectful=0.05,
                              rambling=0.05), "pretrain_loss_regression": ppo_reg},
            "ppo_ptx": {**_policy(sft, ptx_win), "pretrain_loss_regression": ptx_reg},
            "wall_seconds": 100.0, "name": "x"}


def test_summary_statistics_and_targets_per_seed_and_on_the_mean():
    reports = {0: _report(0.7, 0.6, 0.65, 0.62, 0.1, -0.1, ptx_win=0.6),
               1: _report(0.5, 0.6, 0.55, 0.4, 0.1, 0.2, best=(0.6, 0.58))}
    summary = sweep.summarize(reports)
    rm = summary["stats"]["rm.val_accuracy"]
    assert rm["values"] == [0.7, 0.5]
    assert rm["mean"] == pytest.approx(0.6)
    assert rm["std"] == pytest.approx(0.1414213562, rel=1e-6)  # sample std, n - 1
    assert summary["stats"]["ppo.sampled.win_rate_vs_sft"]["mean"] == pytest.approx(0.51)
    assert "name" not in summary["stats"]
    assert summary["targets"][0] == {"rm_accuracy": True, "ppo_beats_sft": True, "rm_best_of_n": True,
                                     "ptx_smaller_tax": True}
    assert summary["targets"][1] == {"rm_accuracy": False, "ppo_beats_sft": False, "rm_best_of_n": False,
                                     "ptx_smaller_tax": False}
    # means: PPO wins 0.51 < 0.60, PPO-ptx 0.55 >= 0.55; every PPO flaw rate is below SFT's
    assert summary["mean_targets"] == {"ppo_win_rate": False, "ptx_win_rate": True, "ppo_fewer_flaws": True}
    table = sweep.markdown(summary, "x")
    assert "| RM held-out accuracy (noisy labels) | 0.600 ± 0.141 | 0.700 | 0.500 |" in table
    assert "| ppo_beats_sft | met | not met |" in table
    assert "| ppo_fewer_flaws | met |" in table


def test_one_seed_has_zero_spread():
    summary = sweep.summarize({3: _report(0.7, 0.6, 0.65, 0.6, 0.1, -0.1)})
    assert summary["stats"]["ppo.sampled.gold_score"] == {"mean": 0.65, "std": 0.0, "values": [0.65]}
