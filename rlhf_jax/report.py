"""A run's report: ``report.json`` (numbers), ``report.md`` (the same, readable, with sample
generations) and PNG plots drawn from each stage's ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from rlhf_jax.logging import read_metrics

PLOTS = ("sft_rm_loss.png", "rm_accuracy.png", "ppo_training.png", "gold_vs_kl.png")


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _metrics(workdir: pathlib.Path, stage: str) -> list[dict]:
    path = workdir / stage / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def write_plots(workdir: pathlib.Path, ppo_stages: tuple[str, ...]) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sft, rm = _metrics(workdir, "sft"), _metrics(workdir, "rm")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, rows, name, val_key in ((axes[0], sft, "SFT", "val/loss"), (axes[1], rm, "RM", "val/rm_loss")):
        ax.plot(*_series(rows, "train/loss"), label="train")
        ax.plot(*_series(rows, val_key), "o-", label="validation")
        ax.set(title=f"{name} loss", xlabel="step", ylabel="loss")
        ax.legend()
    paths.append(_save(fig, workdir / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*_series(rm, "val/rm_accuracy"), "o-")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(title="RM held-out pairwise accuracy", xlabel="step", ylabel="accuracy", ylim=(0.4, 1.0))
    ax.legend()
    paths.append(_save(fig, workdir / PLOTS[1]))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for stage in ppo_stages:
        rows = _metrics(workdir, stage)
        axes[0].plot(*_series(rows, "ppo/score"), label=stage)
        axes[1].plot(*_series(rows, "ppo/kl_to_ref"), label=stage)
        axes[2].plot(*_series(rows, "eval/gold_score"), "o-", label=stage)
    for ax, title in zip(axes, ("RM score (train episodes)", "KL to SFT (per episode)", "gold score (held out)")):
        ax.set(title=title, xlabel="iteration")
        ax.legend()
    paths.append(_save(fig, workdir / PLOTS[2]))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stage in ppo_stages:
        rows = [r for r in _metrics(workdir, stage) if "eval/gold_score" in r]
        ax.plot([r["eval/kl_to_ref"] for r in rows], [r["eval/gold_score"] for r in rows], "o-", label=stage)
    ax.set(title="gold score against KL to SFT", xlabel="KL(policy || SFT), held out", ylabel="gold score")
    ax.legend()
    paths.append(_save(fig, workdir / PLOTS[3]))
    return paths


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(workdir: pathlib.Path, report: dict[str, Any], samples: list[dict[str, str]],
                 ppo_stages: tuple[str, ...]) -> None:
    """Writes report.json, the plots and report.md into ``workdir``."""
    bad = [f"{stage}.{k}" for stage, values in report.items() if isinstance(values, dict)
           for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    report = dict(report, non_finite=bad)
    (workdir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_plots(workdir, ppo_stages)
    large = "sft_large" in report  # a larger SFT model (the RM's base) as a second baseline
    policies = ("sft", *(("sft_large",) if large else ()), *ppo_stages)
    lines = [f"# rlhf_jax report: {report.get('name', '')}", "",
             f"Wall time: {report['wall_seconds']:.0f} s.", "",
             "| policy | gold score | win rate vs SFT | " + ("win rate vs large SFT | " if large else "")
             + "KL to SFT | pretraining loss | RM score |",
             "|---" * (7 if large else 6) + "|"]
    for stage in policies:
        r = report[stage]
        kl = "-" if stage == "sft_large" else _fmt(r.get("kl_to_sft", 0.0))
        lines.append(f"| {stage} | {_fmt(r['gold_score'])} | {_fmt(r.get('win_rate_vs_sft', '-'))} | "
                     + (f"{_fmt(r.get('win_rate_vs_sft_large', '-'))} | " if large else "")
                     + f"{kl} | {_fmt(r['pretrain_loss'])} | {_fmt(r['rm_score'])} |")
    lines += ["", f"Reward model held-out pairwise accuracy: {_fmt(report['rm']['val_accuracy'])} "
              f"(labelers agree with each other on about 73% of pairs).", ""]
    rm = report["rm"]
    if "best_of_n" in rm:
        lines += [f"The RM as a best-of-{rm['best_of_n']} selector among the SFT policy's samples (held out): "
                  f"gold score {_fmt(rm['best_of_n_gold'])} for its pick, against {_fmt(rm['best_of_n_random_gold'])} "
                  f"for a random sample and {_fmt(rm['best_of_n_oracle_gold'])} for the gold-best one. PPO climbs "
                  f"the gold score only as far as the RM picks better than at random.", ""]
    lines += [f"![{name}]({name})" for name in PLOTS]
    lines += ["", "## Sample held-out responses", "", "| prompt | " + " | ".join(policies) + " |",
              "|---" * (1 + len(policies)) + "|"]
    for sample in samples:
        lines.append(f"| {sample['prompt']} | " + " | ".join(sample[s] for s in policies) + " |")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
