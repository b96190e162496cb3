"""The whole pipeline on a micro config: every stage runs, the report is complete and finite."""

import dataclasses
import json
import math

import pytest

from rlhf_jax.config import CheckpointConfig, ConfigError, ModelConfig
from rlhf_jax.default_config import default_config
from rlhf_jax.logging import read_metrics
from rlhf_jax.pipeline import run_pipeline
from rlhf_jax.report import PLOTS
from tests.helpers import f32_rtol

POLICY_KEYS = ["gold_score", "gold_score_stderr", "constraint_violation", "hallucination", "offensive", "rambling",
               "attempts_instruction", "rm_score", "response_length", "eos_rate"]
SPLITS = ("greedy", "sampled", "heldout_greedy", "heldout_sampled")
REPORT_KEYS = (["rm.val_accuracy", "rm.best_of_n_gold", "rm.best_of_n_random_gold", "rm.best_of_n_oracle_gold",
                "comparisons.inter_labeler_agreement", "comparisons.labels_gold_agreement", "wall_seconds",
                "sft.pretrain_loss", "ppo.pretrain_loss", "ppo_ptx.pretrain_loss", "ppo.pretrain_loss_regression",
                "ppo_ptx.pretrain_loss_regression"]
               + [f"{p}.{s}.{k}" for p in ("sft", "ppo", "ppo_ptx") for s in SPLITS for k in POLICY_KEYS]
               + [f"{p}.{s}.win_rate_vs_sft{e}" for p in ("ppo", "ppo_ptx") for s in SPLITS for e in ("", "_stderr")]
               + [f"{p}.sampled.kl_to_sft" for p in ("ppo", "ppo_ptx")])


def micro_config():
    cfg = default_config()
    few = lambda stage, **kw: dataclasses.replace(stage, **kw)  # noqa: E731
    return dataclasses.replace(
        cfg,
        model=ModelConfig(family="llama", vocab_size=168, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64),
        pretrain=few(cfg.pretrain, max_steps=4, eval_every=4, log_every=2),
        sft=few(cfg.sft, max_steps=4, eval_every=4, log_every=2),
        comparisons=few(cfg.comparisons, n_prompts=32),
        rm=few(cfg.rm, max_steps=3, log_every=1),
        ppo=few(cfg.ppo, iterations=2, eval_every=1, prompts=dataclasses.replace(cfg.ppo.prompts, batch_size=16),
                minibatch_size=8, pretrain=dataclasses.replace(cfg.ppo.pretrain, batch_size=8),
                checkpoint=CheckpointConfig(save_every=1)),
        # the frontier's draws are the RM diagnosis's 8: no sampling beyond what it always did
        pipeline=few(cfg.pipeline, frontier=(1, 2, 4, 8)),
    )


def _get(report, dotted):
    value = report
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.slow
def test_micro_pipeline_writes_a_complete_report(tmp_path):
    report = run_pipeline(micro_config(), tmp_path, show_progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    for key in REPORT_KEYS:
        assert math.isfinite(_get(report, key)), key
        assert _get(on_disk, key) == _get(report, key)
    # rates that need prompts of their kind: the 200 held-out prompts have every kind
    for key in ("offensive_respectful", "offensive_toxic", "rambling_chatty"):
        assert math.isfinite(report["ppo"]["sampled"][key]), key
    assert on_disk["non_finite"] == []
    ev = report["evaluation"]
    assert (ev["samples_per_prompt"], ev["kl_estimator"], ev["temperature"]) == (4, "k1", 1.0)
    assert ev["prompts"] == 200 and ev["heldout_prompts"] == 200
    # KL is only estimated on sampled responses, and the SFT model is not compared with itself
    assert "kl_to_sft" not in report["ppo"]["greedy"] and "kl_to_sft" not in report["sft"]["sampled"]
    assert "win_rate_vs_sft" not in report["sft"]["sampled"]
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size > 1000, name
    markdown = (tmp_path / "report.md").read_text()
    assert "| ppo_ptx |" in markdown and "Sample held-out responses (sampled)" in markdown
    assert "best-of-8 selector" in markdown and "Held-out instructions" in markdown
    assert "Metadata (sampled" in markdown and "hallucination" in markdown
    rm = report["rm"]  # the oracle's pick is at least as good as any other among the same samples
    assert rm["best_of_n"] == 8
    assert rm["best_of_n_oracle_gold"] >= max(rm["best_of_n_gold"], rm["best_of_n_random_gold"])
    assert rm["best_of_n_oracle_gold"] > rm["best_of_n_random_gold"]  # the 8 draws differ
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx"):
        assert (tmp_path / stage / "export" / "export.json").exists(), stage
    # PPO's periodic evaluation samples at the training temperature, so it reports a KL
    # estimate and the task's metadata rates beside the gold score
    evals = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if "eval/gold_score" in r]
    assert evals and all("eval/kl_to_ref" in r and "eval/hallucination" in r for r in evals)
    assert evals[0]["eval/kl_to_ref"] == 0.0  # at step 0 the policy is the SFT model
    # the wall time is the sum of the stages' times and the evaluation's
    stages = ("pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx", "evaluation")
    assert set(report["stage_seconds"]) == set(stages) and all(report["stage_seconds"][s] > 0 for s in stages)
    assert report["wall_seconds"] == pytest.approx(sum(report["stage_seconds"].values()))
    # a rerun finds every stage finished and only re-evaluates; its report still counts the
    # time the stages took when they ran, not only the re-evaluation's
    again = run_pipeline(micro_config(), tmp_path, show_progress=False)
    assert again["ppo"]["sampled"]["gold_score"] == report["ppo"]["sampled"]["gold_score"]
    for name in stages[:-1]:
        assert again["stage_seconds"][name] == report["stage_seconds"][name], name
    assert again["wall_seconds"] > again["stage_seconds"]["evaluation"] + report["stage_seconds"]["pretrain"]


@pytest.mark.slow
def test_micro_pipeline_with_a_larger_reward_model_and_a_gold_reward_run(tmp_path):
    """rm.model: the RM (and so the value model) starts from a larger model that the
    pipeline pretrains and fine-tunes too; PPO and evaluation read its architecture from the
    export; the report compares every policy with that larger SFT model. ppo_gold: a
    PPO run whose reward is the gold scorer, so its training score is the gold score."""
    cfg = micro_config()
    large = dataclasses.replace(cfg.model, n_layers=2, d_model=48)
    cfg = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, model=large, init_from="run:sft_large/export"),
                              pipeline=dataclasses.replace(cfg.pipeline, methods=("ppo", "ppo_gold")))
    report = run_pipeline(cfg, tmp_path, show_progress=False)
    for key in ("sft_large.sampled.gold_score", "sft_large.greedy.hallucination", "sft_large.pretrain_loss",
                "ppo.sampled.win_rate_vs_sft_large", "ppo.heldout_greedy.win_rate_vs_sft_large",
                "ppo.sampled.win_rate_vs_sft", "rm.val_accuracy", "ppo_gold.sampled.gold_score",
                "ppo_gold.sampled.win_rate_vs_sft_large"):
        assert math.isfinite(_get(report, key)), key
    # ppo_gold's held-out evaluation scores with its reward, the gold scorer: the two agree
    evals = [r for r in read_metrics(tmp_path / "ppo_gold" / "metrics.jsonl") if "eval/score" in r]
    # the reward is the gold score rounded to float32 and averaged in it over the 200 held-out
    # prompts' responses; gold scores are at most 1 (tests.helpers.f32_rtol)
    assert evals and all(abs(r["eval/score"] - r["eval/gold_score"]) <= f32_rtol(200) for r in evals)
    assert "| ppo_gold |" in (tmp_path / "report.md").read_text()
    meta = lambda stage: json.loads((tmp_path / stage / "export" / "export.json").read_text())["model"]  # noqa: E731
    assert meta("sft_large")["n_layers"] == meta("rm")["n_layers"] == 2 and meta("rm")["d_model"] == 48
    assert meta("ppo")["d_model"] == meta("sft")["d_model"] == 32
    # the run's saved config is the one given, not a stage's architecture swap
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["rm"]["model"]["d_model"] == 48
    assert "| sft_large |" in (tmp_path / "report.md").read_text()


def test_a_negative_best_of_n_is_refused_before_any_stage_runs(tmp_path):
    cfg = micro_config()
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, best_of_n=-1))
    with pytest.raises(ConfigError, match="pipeline.best_of_n"):
        run_pipeline(cfg, tmp_path, show_progress=False)
    assert not (tmp_path / "pretrain").exists()


def test_ppo_ptx_coef_which_the_pipeline_sets_itself_is_refused_not_ignored(tmp_path):
    cfg = micro_config()
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, ptx_coef=1.0))
    with pytest.raises(ConfigError, match="pipeline.ptx_coef"):
        run_pipeline(cfg, tmp_path, show_progress=False)
    assert not (tmp_path / "pretrain").exists()


def test_an_unknown_method_is_refused_before_any_stage_runs(tmp_path):
    cfg = micro_config()
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, methods=("ppo", "ppo2")))
    with pytest.raises(ConfigError, match=r"pipeline.methods=\['ppo', 'ppo2'\]: \['ppo2'\] not a method"):
        run_pipeline(cfg, tmp_path, show_progress=False)
    assert not (tmp_path / "pretrain").exists()
