"""The pipeline's headline over several seeds, against the InstructGPT targets.

Each seed is a whole pipeline run (its own task data, models and labeler noise) in
``<workdir>/seed_<s>``; finished runs are reused, an interrupted one resumes. Writes
``<workdir>/sweep.json`` (every run's report, mean and std of each number, and each target
met or not per seed) and ``<workdir>/sweep.md``.

    python -m rlhf_jax.sweep --workdir runs/sweep                 # embedded default
    python -m rlhf_jax.sweep --config experiments/small_ppo_vs_large_sft.py \\
        --workdir runs/sweep_large --seeds 0 1 2

Targets (issue 6; the paper's findings in miniature):
- ``rm_above_chance``: the RM's held-out pairwise accuracy is well above chance (> 0.6;
  noisy labelers agree on about 73% of pairs, which bounds it).
- ``ppo_beats_sft``: PPO's gold score is above SFT's and it wins over SFT on more than half of
  the held-out prompts.
- ``ptx_smaller_tax``: PPO-ptx's pretraining-loss regression from SFT is smaller than PPO's.
- ``small_ppo_beats_large_sft`` (configs with ``rm.model``): PPO on the small model wins
  over the larger SFT-only model on more than half of the prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

RM_WELL_ABOVE_CHANCE = 0.6


def targets(report: dict) -> dict[str, bool]:
    out = {"rm_above_chance": report["rm"]["val_accuracy"] > RM_WELL_ABOVE_CHANCE,
           "ppo_beats_sft": (report["ppo"]["gold_score"] > report["sft"]["gold_score"]
                             and report["ppo"]["win_rate_vs_sft"] > 0.5)}
    if "ppo_ptx" in report:
        out["ptx_smaller_tax"] = (report["ppo_ptx"]["pretrain_loss_regression"]
                                  < report["ppo"]["pretrain_loss_regression"])
    if "sft_large" in report:
        out["small_ppo_beats_large_sft"] = report["ppo"]["win_rate_vs_sft_large"] > 0.5
    return out


def numbers(report: dict) -> dict[str, float]:
    """The report's numbers as flat ``stage.key`` entries."""
    flat = {}
    for stage, values in report.items():
        if isinstance(values, dict):
            flat.update({f"{stage}.{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))})
        elif isinstance(values, (int, float)):
            flat[stage] = float(values)
    return flat


def summarize(reports: dict[int, dict]) -> dict:
    flat = {seed: numbers(r) for seed, r in reports.items()}
    keys = sorted(set.intersection(*(set(f) for f in flat.values())))
    stats = {}
    for key in keys:
        values = [flat[s][key] for s in reports]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        stats[key] = {"mean": statistics.fmean(values), "std": std, "values": values}
    met = {seed: targets(r) for seed, r in reports.items()}
    return {"seeds": list(reports), "stats": stats, "targets": met, "reports": reports}


def markdown(summary: dict, title: str) -> str:
    stats, seeds = summary["stats"], summary["seeds"]
    rows = [("RM held-out accuracy", "rm.val_accuracy")]
    for stage in ("sft", "sft_large", "ppo", "ppo_ptx", "ppo_gold"):
        rows += [(f"{stage} gold score", f"{stage}.gold_score"),
                 (f"{stage} win rate vs SFT", f"{stage}.win_rate_vs_sft"),
                 (f"{stage} win rate vs large SFT", f"{stage}.win_rate_vs_sft_large"),
                 (f"{stage} KL to SFT", f"{stage}.kl_to_sft"),
                 (f"{stage} pretraining loss", f"{stage}.pretrain_loss")]
    rows.append(("wall seconds", "wall_seconds"))
    lines = [f"# {title}: seeds {', '.join(map(str, seeds))}", "",
             "| | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (2 + len(seeds)) + "|"]
    for label, key in rows:
        if key in stats and not (key.startswith("sft.") and key.endswith(("win_rate_vs_sft", "kl_to_sft"))):
            s = stats[key]
            lines.append(f"| {label} | {s['mean']:.3f} ± {s['std']:.3f} | "
                         + " | ".join(f"{v:.3f}" for v in s["values"]) + " |")
    names = sorted(set().union(*(t.keys() for t in summary["targets"].values())))
    lines += ["", "| target | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (1 + len(seeds)) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join("met" if summary["targets"][s].get(name) else "not met"
                                                 for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="an experiment file with get_config(); default: the embedded default")
    parser.add_argument("--workdir", default="runs/sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    from rlhf_jax.host import keep_freed_memory

    keep_freed_memory()  # before the JAX backend starts its threads
    from rlhf_jax.config import load_experiment
    from rlhf_jax.default_config import default_config
    from rlhf_jax.pipeline import run_pipeline

    base = load_experiment(args.config) if args.config else default_config()
    workdir = pathlib.Path(args.workdir)
    reports = {}
    for seed in args.seeds:
        run_dir = workdir / f"seed_{seed}"
        print(f"seed {seed}: {run_dir}", flush=True)
        reports[seed] = run_pipeline(dataclasses.replace(base, seed=seed), run_dir)
    summary = summarize(reports)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = markdown(summary, base.name)
    (workdir / "sweep.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
