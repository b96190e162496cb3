"""Every method after the RM on the embedded default, side by side against the gold score:
PPO, PPO-ptx, RLOO, GRPO, DPO (K-wise, from the same comparisons as the RM) and best-of-n,
each from the same SFT model and (but DPO) the same reward model.

    python experiments/methods.py --workdir runs/methods --seeds 0 1 2

runs the pipeline with ``pipeline.methods`` = all of them per seed (a finished seed is reused),
then writes ``<workdir>/methods.json`` and ``methods.md``: each method's gold score, win rate
over SFT and KL to SFT per seed, which methods beat PPO and the best-of-n frontier at equal
KL (their gold score against PPO's held-out curve, and the frontier, interpolated at the
method's KL), and ``methods.png``, gold score against KL over seeds. ``rlhf-jax pipeline
--config experiments/methods.py`` runs one seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

from rlhf_jax.config import Config
from rlhf_jax.default_config import default_config

METHODS = ("ppo", "ppo_ptx", "rloo", "grpo", "dpo", "best_of_n")


def get_config() -> Config:
    cfg = default_config()
    return dataclasses.replace(cfg, name="methods", pipeline=dataclasses.replace(cfg.pipeline, methods=METHODS))


def gold_at_kl(points: list[tuple[float, float]], kl: float) -> tuple[float, bool]:
    """A curve's gold score at ``kl``, linear between its points (sorted by KL): (gold, whether
    ``kl`` lies within the curve's range; outside, the nearest end's gold)."""
    points = sorted(points)
    if kl <= points[0][0] or kl >= points[-1][0]:
        end = points[0] if kl <= points[0][0] else points[-1]
        return end[1], points[0][0] <= kl <= points[-1][0]
    for (k0, g0), (k1, g1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return g0 + (g1 - g0) * (kl - k0) / max(k1 - k0, 1e-12), True
    raise AssertionError("unreachable")


def ppo_curve(run_dir: pathlib.Path, report: dict) -> list[tuple[float, float]]:
    """PPO's held-out (KL, gold) over its iterations, and its final evaluation."""
    from rlhf_jax.logging import read_metrics

    rows = [r for r in read_metrics(run_dir / "ppo" / "metrics.jsonl") if "eval/kl_to_ref" in r]
    final = report["ppo"]["sampled"]
    return [(r["eval/kl_to_ref"], r["eval/gold_score"]) for r in rows] + [(final["kl_to_sft"], final["gold_score"])]


def compare(run_dir: pathlib.Path, report: dict) -> dict[str, dict]:
    """Per method: its gold score, win rates and KL, and its gold against PPO's curve and the
    best-of-n frontier at its KL."""
    curve = ppo_curve(run_dir, report)
    frontier = [(p["kl_to_sft"], p["gold_score"]) for p in report.get("frontier", [])]
    out = {}
    for method in METHODS:
        if method not in report:
            continue
        sampled = report[method]["sampled"]
        kl, gold = sampled["kl_to_sft"], sampled["gold_score"]
        row = {"gold_score": gold, "kl_to_sft": kl, "win_rate_vs_sft": sampled["win_rate_vs_sft"],
               "win_rate_vs_sft_greedy": report[method].get("greedy", {}).get("win_rate_vs_sft"),
               "pretrain_loss_regression": report[method]["pretrain_loss_regression"],
               "seconds": report["stage_seconds"].get(method, report[method].get("wall_seconds"))}
        if method != "ppo":
            ppo_gold, inside = gold_at_kl(curve, kl)
            row.update(ppo_gold_at_kl=ppo_gold, vs_ppo_at_kl=gold - ppo_gold, within_ppo_kl_range=inside)
        if frontier:
            best_of_n, inside = gold_at_kl(frontier, kl)
            row.update(frontier_gold_at_kl=best_of_n, vs_frontier_at_kl=gold - best_of_n,
                       within_frontier_kl_range=inside)
        out[method] = row
    return out


def markdown(per_seed: dict[int, dict], sft: dict[int, float]) -> str:
    seeds = list(per_seed)
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# All methods, seeds {', '.join(map(str, seeds))} (held-out prompts, sampled)", "",
             "| method | gold (mean) | " + " | ".join(f"gold s{s}" for s in seeds) + " | win vs SFT (mean) | "
             "KL to SFT (mean) | gold - PPO at equal KL | gold - best-of-n at equal KL | seconds (mean) |",
             "|---" * (7 + len(seeds)) + "|",
             "| sft | " + fmt(mean(list(sft.values()))) + " | " + " | ".join(fmt(sft[s]) for s in seeds)
             + " | - | 0 | - | - | - |"]
    for method in METHODS:
        rows = [per_seed[s][method] for s in seeds if method in per_seed[s]]
        if not rows:
            continue
        get = lambda key: [r[key] for r in rows if r.get(key) is not None]  # noqa: E731
        vs_ppo = get("vs_ppo_at_kl")
        lines.append(f"| {method} | {fmt(mean(get('gold_score')))} | "
                     + " | ".join(fmt(per_seed[s][method]["gold_score"]) for s in seeds) + " | "
                     f"{fmt(mean(get('win_rate_vs_sft')))} | {fmt(mean(get('kl_to_sft')))} | "
                     + (", ".join(f"{v:+.3f}" for v in vs_ppo) if vs_ppo else "-") + " | "
                     + ", ".join(f"{v:+.3f}" for v in get("vs_frontier_at_kl")) + f" | {fmt(mean(get('seconds')))} |")
    lines += ["", "Per seed, gold - PPO at equal KL: PPO's held-out gold score interpolated at the method's KL "
              "along its evaluations over its iterations (outside PPO's KL range, its nearest end); the same "
              "against the best-of-n frontier (n = 1..16, KL log n - (n - 1) / n)."]
    return "\n".join(lines) + "\n"


def plot(per_seed: dict[int, dict], frontiers: dict[int, list], sft: dict[int, float], path: pathlib.Path) -> None:
    """Each seed's gold score gain over its SFT policy against KL to SFT: every method's final
    policy and the best-of-n frontier (seeds differ in task data, so gains pool, scores not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for seed, points in frontiers.items():
        ax.plot([p["kl_to_sft"] for p in points], [p["gold_score"] - sft[seed] for p in points], "k--", alpha=0.4,
                marker="s", markersize=3, label="best-of-n of SFT (n = 1..16)" if seed == min(frontiers) else None)
    for index, method in enumerate(METHODS):
        points = [(r[method]["kl_to_sft"], r[method]["gold_score"] - sft[s]) for s, r in per_seed.items()
                  if method in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", color=f"C{index}", label=method)
    ax.axhline(0.0, color="grey", linestyle=":", label="SFT")
    ax.set(title=f"gold score gain over SFT against KL to SFT, seeds {', '.join(map(str, per_seed))}",
           xlabel="KL(policy || SFT), nats per response", ylabel="gold score - SFT's (held out, sampled)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    from rlhf_jax.host import keep_freed_memory

    keep_freed_memory()  # before the JAX backend starts its threads
    from rlhf_jax.pipeline import run_pipeline
    from rlhf_jax.sweep import markdown as sweep_markdown
    from rlhf_jax.sweep import summarize

    workdir = pathlib.Path(args.workdir)
    reports, per_seed = {}, {}
    for seed in args.seeds:
        run_dir = workdir / f"seed_{seed}"
        print(f"seed {seed}: {run_dir}", flush=True)
        reports[seed] = run_pipeline(dataclasses.replace(get_config(), seed=seed), run_dir)
        per_seed[seed] = compare(run_dir, reports[seed])
    sft = {s: r["sft"]["sampled"]["gold_score"] for s, r in reports.items()}
    summary = summarize(reports)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "methods.json").write_text(json.dumps({"per_seed": per_seed, "sft_gold": sft, "sweep": summary},
                                                     indent=2, sort_keys=True) + "\n")
    table = markdown(per_seed, sft) + "\n" + sweep_markdown(summary, "methods")
    (workdir / "methods.md").write_text(table)
    plot(per_seed, {s: r.get("frontier", []) for s, r in reports.items()}, sft, workdir / "methods.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
