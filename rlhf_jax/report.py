"""A run's report: ``report.json`` (numbers), ``report.md`` (the same, readable, with sample
generations) and PNG plots drawn from the evaluation and each stage's ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from rlhf_jax.atomic import replace_file, write_text
from rlhf_jax.logging import read_metrics

PLOTS = ("sft_rm_loss.png", "rm_accuracy.png", "ppo_training.png", "gold_vs_sqrt_kl.png", "metadata.png",
         "frontier.png")
# The paper's Fig. 4 metadata, as the report's keys and labels (lower is better but the last).
METADATA = (("constraint_violation", "fails explicit constraint"), ("hallucination", "hallucination"),
            ("offensive_respectful", "offensive (respectful prompts)"), ("rambling", "rambling / no EOS"),
            ("attempts_instruction", "attempts correct instruction"))


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _metrics(workdir: pathlib.Path, stage: str) -> list[dict]:
    path = workdir / stage / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def _policies(report: dict[str, Any], methods: tuple[Any, ...]) -> list[str]:
    return [p for p in ("sft", "sft_large", *(m.name for m in methods)) if p in report]


def _eval_curve(workdir: pathlib.Path, stage: str) -> list[dict]:
    """A stage's held-out evaluations that have both a gold score and a KL estimate."""
    return [r for r in _metrics(workdir, stage) if "eval/gold_score" in r and "eval/kl_to_ref" in r]


def write_plots(workdir: pathlib.Path, report: dict[str, Any], methods: tuple[Any, ...]) -> list[pathlib.Path]:
    """The plots of :data:`PLOTS`; ``methods``: the stages of :mod:`rlhf_jax.stages.table` the run has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    online = [m for m in methods if m.online]
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
    for method in online:  # each names its training metrics after its config block: ppo/score, grpo/score
        rows = _metrics(workdir, method.name)
        axes[0].plot(*_series(rows, f"{method.block}/score"), label=method.name)
        axes[1].plot(*_series(rows, f"{method.block}/kl_to_ref"), label=method.name)
        axes[2].plot(*_series(rows, "eval/gold_score"), "o-", label=method.name)
    for ax, title in zip(axes, ("RM score (train episodes)", "KL to SFT (per episode)", "gold score (held out, sampled)")):
        ax.set(title=title, xlabel="iteration")
        ax.legend()
    paths.append(_save(fig, workdir / PLOTS[2]))

    # Gao et al. (2022): gold and proxy (RM) score against sqrt(KL) as PPO moves away from SFT
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for method in online:
        rows = _eval_curve(workdir, method.name)
        root_kl = [math.sqrt(max(r["eval/kl_to_ref"], 0.0)) for r in rows]
        axes[0].plot(root_kl, [r["eval/gold_score"] for r in rows], "o-", label=method.name)
        axes[1].plot(root_kl, [r["eval/score"] for r in rows], "o-", label=method.name)
    for ax, title in zip(axes, ("gold score", "RM score (proxy)")):
        ax.set(title=f"{title} against sqrt KL to SFT", xlabel="sqrt KL(policy || SFT), held out, sampled")
        ax.legend()
    paths.append(_save(fig, workdir / PLOTS[3]))

    # The paper's Fig. 4 in miniature: metadata rates per policy
    splits = [s for s in ("sampled", "greedy", "heldout_sampled") if s in report.get("sft", {})]
    policies = _policies(report, methods)
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    width = 0.8 / max(len(policies), 1)
    for ax, split in zip(axes[0], splits):
        for i, policy in enumerate(policies):
            rates = [report[policy].get(split, {}).get(key, float("nan")) for key, _ in METADATA]
            ax.bar([j + i * width for j in range(len(METADATA))], rates, width, label=policy)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METADATA))], [label for _, label in METADATA],
                      rotation=30, ha="right", fontsize=8)
        ax.set(title=f"metadata ({split.replace('_', ' ')})", ylabel="rate", ylim=(0, 1))
        ax.legend(fontsize=8)
    paths.append(_save(fig, workdir / PLOTS[4]))
    paths.append(_save(frontier_plot(workdir, report, methods), workdir / PLOTS[5]))
    return paths


def frontier_plot(workdir: pathlib.Path, report: dict[str, Any], methods: tuple[Any, ...]):
    """Gold score against KL to SFT (held out, sampled): best-of-n of SFT samples at each n
    (analytic KL) as the reference frontier, each online method's held-out evaluations over
    its iterations, and every method's final policy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if report.get("frontier"):
        points = report["frontier"]
        ax.plot([p["kl_to_sft"] for p in points], [p["gold_score"] for p in points], "k--", marker="s",
                label="best-of-n of SFT (frontier)")
        for p in points:
            ax.annotate(f"n={p['n']}", (p["kl_to_sft"], p["gold_score"]), fontsize=7, textcoords="offset points",
                        xytext=(3, -9))
    for index, method in enumerate(methods):
        color = f"C{index}"
        if method.online:
            rows = _eval_curve(workdir, method.name)
            ax.plot([r["eval/kl_to_ref"] for r in rows], [r["eval/gold_score"] for r in rows], ".-", color=color,
                    alpha=0.5, label=f"{method.name} (iterations)")
        final = report.get(method.name, {}).get("sampled", {})
        if "kl_to_sft" in final:
            ax.plot([final["kl_to_sft"]], [final["gold_score"]], "*", markersize=12, color=color,
                    label=f"{method.name} (final)")
    if "sft" in report:
        ax.axhline(report["sft"]["sampled"]["gold_score"], color="grey", linestyle=":", label="SFT")
    ax.set(title="gold score against KL to SFT (held out, sampled)", xlabel="KL(policy || SFT), nats per response",
           ylabel="gold score")
    ax.legend(fontsize=7, loc="best")
    return fig


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:  # a full disk leaves the old plot, not a cut one
        replace_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".")))
    finally:
        plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def non_finite(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of every non-finite float in a nested report."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += non_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(prefix + key)
    return out


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]]


def methods_table(report: dict[str, Any], methods: tuple[Any, ...]) -> list[str]:
    """The methods side by side: gold score, win rates over SFT, KL to SFT, alignment tax,
    the metadata flaw rates and wall seconds; then the best-of-n frontier they are judged
    against (the same gold score at equal KL)."""
    ev, names = report["evaluation"], [m.name for m in methods if m.name in report]
    seconds = report.get("stage_seconds", {})
    get = lambda policy, split, key: report[policy].get(split, {}).get(key, "-")  # noqa: E731
    lines = ["", f"Methods (held out; KL to SFT: summed {ev['kl_estimator']} on sampled responses, best-of-n's "
             "analytic log n - (n - 1) / n):", ""]
    lines += _table(["method", "gold (sampled)", "win vs sft (sampled)", "win vs sft (greedy)", "KL to SFT",
                     "pretraining-loss regression", *[label for _, label in METADATA], "wall seconds"],
                    [["sft", get("sft", "sampled", "gold_score"), "-", "-", 0.0, 0.0,
                      *[get("sft", "sampled", key) for key, _ in METADATA], "-"]]
                    + [[m, get(m, "sampled", "gold_score"), get(m, "sampled", "win_rate_vs_sft"),
                        get(m, "greedy", "win_rate_vs_sft"), get(m, "sampled", "kl_to_sft"),
                        report[m].get("pretrain_loss_regression", "-"), *[get(m, "sampled", key) for key, _ in METADATA],
                        seconds.get(m, report[m].get("wall_seconds", "-"))] for m in names])
    if report.get("frontier"):
        lines += ["", "Best-of-n of the SFT policy's samples, picked by the RM (the frontier of the plot below):", ""]
        lines += _table(["n", "KL to SFT", "gold (sampled)", "RM score"],
                        [[p["n"], p["kl_to_sft"], p["gold_score"], p["rm_score"]] for p in report["frontier"]])
    return lines


def _stage_times(report: dict[str, Any]) -> str:
    """What the wall time adds up: `` (sft 205 s, ..., evaluation 175 s)``. A stage run by its
    own command records no time (only the pipeline does), so ``rlhf-jax evaluate``'s report
    counts what it knows, and says so."""
    seconds = report.get("stage_seconds", {})
    return f" ({', '.join(f'{name} {value:.0f} s' for name, value in seconds.items())})" if seconds else ""


def write_report(workdir: pathlib.Path, report: dict[str, Any], samples: dict[str, list[dict[str, str]]],
                 methods: tuple[Any, ...]) -> None:
    """Writes report.json, the plots and report.md into ``workdir``; ``methods``: the stages
    of :mod:`rlhf_jax.stages.table` the run has (``pipeline.methods``)."""
    report = dict(report, non_finite=non_finite(report))
    write_text(workdir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_plots(workdir, report, methods)
    policies = _policies(report, methods)
    baselines = [b for b in ("sft", "sft_large") if b in report]
    ev = report["evaluation"]
    get = lambda policy, split, key: report[policy].get(split, {}).get(key, "-")  # noqa: E731
    lines = [f"# rlhf_jax report: {report.get('name', '')}", "", f"Wall time: {report['wall_seconds']:.0f} s{_stage_times(report)}.", "",
             f"Held-out prompts ({ev['prompts']}): *sampled* is {ev['samples_per_prompt']} responses per prompt at "
             f"the sampling temperature {ev['temperature']} (generation.sampling, the online methods' too), *greedy* "
             f"one; win rates pair each response with the baseline's to the same prompt (and draw), ties half. "
             f"KL to SFT: the summed per-token {ev['kl_estimator']} estimate on sampled responses, at that "
             "temperature.", ""]
    lines += _table(["policy", "gold (sampled)", *[f"win vs {b} (sampled)" for b in baselines], "gold (greedy)",
                     *[f"win vs {b} (greedy)" for b in baselines], "KL to SFT", "pretraining loss", "RM score (sampled)"],
                    [[p, get(p, "sampled", "gold_score"), *[get(p, "sampled", f"win_rate_vs_{b}") for b in baselines],
                      get(p, "greedy", "gold_score"), *[get(p, "greedy", f"win_rate_vs_{b}") for b in baselines],
                      get(p, "sampled", "kl_to_sft"), report[p].get("pretrain_loss", "-"), get(p, "sampled", "rm_score")]
                     for p in policies])
    lines += methods_table(report, methods)
    for split, title in (("sampled", "sampled"), ("greedy", "greedy")):
        lines += ["", f"Metadata ({title}; the paper's Fig. 4): rates over the responses they apply to.", ""]
        lines += _table(["policy", *[label for _, label in METADATA], "offensive (all prompts)"],
                        [[p, *[get(p, split, key) for key, _ in METADATA], get(p, split, "offensive")]
                         for p in policies])
    if "heldout_sampled" in report["sft"]:
        policies = [p for p in policies if "heldout_sampled" in report[p]]
        lines += ["", f"Held-out instructions ({ev['heldout_prompts']} prompts of families only pretraining text "
                  "asks; no demonstration, comparison or PPO prompt):", ""]
        lines += _table(["policy", "gold (sampled)", "win vs sft (sampled)", "gold (greedy)", "win vs sft (greedy)",
                         *[label for _, label in METADATA]],
                        [[p, get(p, "heldout_sampled", "gold_score"), get(p, "heldout_sampled", "win_rate_vs_sft"),
                          get(p, "heldout_greedy", "gold_score"), get(p, "heldout_greedy", "win_rate_vs_sft"),
                          *[get(p, "heldout_sampled", key) for key, _ in METADATA]] for p in policies])
    rm = report["rm"]
    lines += ["", f"Reward model held-out pairwise accuracy: {_fmt(rm['val_accuracy'])}."]
    if "comparisons" in report:
        c = report["comparisons"]
        lines += [f"Its labels agree with a second labeler on {_fmt(c['inter_labeler_agreement'])} of pairs (the "
                  f"paper's labelers: 0.726) and with the gold order on {_fmt(c['labels_gold_agreement'])}."]
    if "best_of_n" in rm:
        lines += [f"The RM as a best-of-{rm['best_of_n']} selector among the SFT policy's samples (held out): "
                  f"gold score {_fmt(rm['best_of_n_gold'])} for its pick, against {_fmt(rm['best_of_n_random_gold'])} "
                  f"for a random sample and {_fmt(rm['best_of_n_oracle_gold'])} for the gold-best one. PPO climbs "
                  f"the gold score only as far as the RM picks better than at random."]
    lines += ["", *[f"![{name}]({name})" for name in PLOTS]]
    for decoding, rows in samples.items():
        lines += ["", f"## Sample held-out responses ({decoding})", "",
                  "| prompt | " + " | ".join(policies) + " |", "|---" * (1 + len(policies)) + "|"]
        lines += [f"| {row['prompt']} | " + " | ".join(row[p] for p in policies) + " |" for row in rows]
    write_text(workdir / "report.md", "\n".join(lines) + "\n")
