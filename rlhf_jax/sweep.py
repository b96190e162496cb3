"""The pipeline's headline over several seeds, against the InstructGPT targets.

Each seed is a whole pipeline run (its own task data, models and labeler noise) in
``<workdir>/seed_<s>``; finished runs are reused, an interrupted one resumes. Writes
``<workdir>/sweep.json`` (every run's report, mean and std of each number, and each target
met or not per seed) and ``<workdir>/sweep.md``.

    python -m rlhf_jax.sweep --workdir runs/sweep                 # embedded default
    python -m rlhf_jax.sweep --config experiments/small_ppo_vs_large_sft.py \\
        --workdir runs/sweep_large --seeds 0 1 2

Targets (the paper's findings in miniature, judged on *sampled* held-out responses: several
per prompt at the sampling temperature; greedy numbers are in every report beside them):

- per seed: ``rm_accuracy`` (held-out accuracy on noisy labels >= 0.66; the paper's 6B RM:
  72.4%), ``rm_best_of_n`` (its best-of-n pick among SFT samples beats a random sample's gold
  score by >= 0.05), ``ppo_beats_sft`` (PPO's gold score above SFT's and its win rate over
  SFT > 0.55), ``ptx_smaller_tax`` (PPO-ptx's pretraining-loss regression from SFT smaller
  than PPO's), and with ``rm.model`` ``small_ptx_beats_large_sft`` (PPO-ptx's win rate over
  the larger SFT model >= 0.55);
- on the mean over seeds: ``ppo_win_rate`` (>= 0.60), ``ptx_win_rate`` (>= 0.55) and
  ``ppo_fewer_flaws`` (every metadata flaw rate lower for PPO than for SFT);
- per seed, for every other method the run has (``pipeline.methods``: RLOO, GRPO, DPO,
  best-of-n, ...), ``<method>_beats_sft`` (its gold score above SFT's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

from rlhf_jax.atomic import write_text
from rlhf_jax.stages.table import METHODS
from rlhf_jax.tasks.gold import FLAWS

RM_ACCURACY = 0.66
BEST_OF_N_GAIN = 0.05
PPO_WIN_RATE_EACH, PPO_WIN_RATE_MEAN, PTX_WIN_RATE_MEAN, SMALL_OVER_LARGE = 0.55, 0.60, 0.55, 0.55
JUDGED_ON = "sampled"


def targets(report: dict) -> dict[str, bool]:
    """The per-seed targets a report meets."""
    rm, sft, ppo = report["rm"], report["sft"][JUDGED_ON], report["ppo"][JUDGED_ON]
    out = {"rm_accuracy": rm["val_accuracy"] >= RM_ACCURACY,
           "ppo_beats_sft": ppo["gold_score"] > sft["gold_score"] and ppo["win_rate_vs_sft"] > PPO_WIN_RATE_EACH}
    if "best_of_n_gold" in rm:
        out["rm_best_of_n"] = rm["best_of_n_gold"] - rm["best_of_n_random_gold"] >= BEST_OF_N_GAIN
    for method in METHODS:
        if method not in ("ppo", "ppo_ptx") and JUDGED_ON in report.get(method, {}):
            out[f"{method}_beats_sft"] = report[method][JUDGED_ON]["gold_score"] > sft["gold_score"]
    if "ppo_ptx" in report:
        out["ptx_smaller_tax"] = (report["ppo_ptx"]["pretrain_loss_regression"]
                                  < report["ppo"]["pretrain_loss_regression"])
        if "sft_large" in report:
            out["small_ptx_beats_large_sft"] = report["ppo_ptx"][JUDGED_ON]["win_rate_vs_sft_large"] >= SMALL_OVER_LARGE
    return out


def mean_targets(stats: dict) -> dict[str, bool]:
    """The targets judged on the mean over seeds."""
    mean = lambda key: stats[key]["mean"] if key in stats else float("nan")  # noqa: E731
    out = {"ppo_win_rate": mean(f"ppo.{JUDGED_ON}.win_rate_vs_sft") >= PPO_WIN_RATE_MEAN,
           "ppo_fewer_flaws": all(mean(f"ppo.{JUDGED_ON}.{f}") < mean(f"sft.{JUDGED_ON}.{f}") for f in FLAWS)}
    if f"ppo_ptx.{JUDGED_ON}.win_rate_vs_sft" in stats:
        out["ptx_win_rate"] = mean(f"ppo_ptx.{JUDGED_ON}.win_rate_vs_sft") >= PTX_WIN_RATE_MEAN
    return out


def numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """The report's numbers as flat dotted entries (``ppo.sampled.gold_score``)."""
    flat = {}
    for key, value in report.items():
        if isinstance(value, list):  # the frontier's points: frontier.0.gold_score, ...
            value = {str(i): v for i, v in enumerate(value) if isinstance(v, dict)}
        if isinstance(value, dict):
            flat.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + key] = float(value)
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
    return {"seeds": list(reports), "stats": stats, "targets": met, "mean_targets": mean_targets(stats),
            "reports": reports}


ROWS = (("RM held-out accuracy (noisy labels)", "rm.val_accuracy"),
        ("labels: agreement with a second labeler", "comparisons.inter_labeler_agreement"),
        ("RM best-of-8 pick among SFT samples: gold", "rm.best_of_n_gold"),
        ("a random SFT sample: gold", "rm.best_of_n_random_gold"),
        ("the gold-best of those samples: gold", "rm.best_of_n_oracle_gold"))
POLICY_ROWS = (("gold score", "gold_score"), ("win rate vs SFT", "win_rate_vs_sft"),
               ("win rate vs large SFT", "win_rate_vs_sft_large"), ("KL to SFT", "kl_to_sft"),
               *((f"rate: {f}", f) for f in (*FLAWS, "attempts_instruction")))


def markdown(summary: dict, title: str) -> str:
    stats, seeds = summary["stats"], summary["seeds"]
    rows = list(ROWS)
    for stage in ("sft", "sft_large", *METHODS):
        for split in ("sampled", "greedy", "heldout_sampled", "heldout_greedy"):
            rows += [(f"{stage} {label} ({split.replace('_', ' ')})", f"{stage}.{split}.{key}")
                     for label, key in POLICY_ROWS]
        rows += [(f"{stage} pretraining loss", f"{stage}.pretrain_loss"),
                 (f"{stage} pretraining-loss regression from SFT", f"{stage}.pretrain_loss_regression"),
                 (f"{stage} seconds", f"stage_seconds.{stage}")]
    rows += [(f"best-of-{point['n']} of SFT samples (the frontier): gold", f"frontier.{i}.gold_score")
             for i, point in enumerate(summary["reports"][seeds[0]].get("frontier", []))]
    rows.append(("wall seconds", "wall_seconds"))
    lines = [f"# {title}: seeds {', '.join(map(str, seeds))}", "",
             "| | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (2 + len(seeds)) + "|"]
    for label, key in rows:
        if key in stats:
            s = stats[key]
            lines.append(f"| {label} | {s['mean']:.3f} ± {s['std']:.3f} | "
                         + " | ".join(f"{v:.3f}" for v in s["values"]) + " |")
    names = sorted(set().union(*(t.keys() for t in summary["targets"].values())))
    lines += ["", f"Targets, judged on {JUDGED_ON} responses:", "",
              "| target | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (1 + len(seeds)) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join("met" if summary["targets"][s].get(name) else "not met"
                                                 for s in seeds) + " |")
    lines += ["", "| target on the mean over seeds | |", "|---|---|"]
    lines += [f"| {name} | {'met' if ok else 'not met'} |" for name, ok in sorted(summary["mean_targets"].items())]
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
    # whole or not at all, as the report is (a full disk leaves the previous summary)
    write_text(workdir / "sweep.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = markdown(summary, base.name)
    write_text(workdir / "sweep.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
