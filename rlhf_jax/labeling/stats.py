"""``rlhf-jax label --stats``: how much the labelers agree, and with the gold scorer.

- ``inter_labeler_agreement``: over every overlap item two labelers both labeled and every
  pair of responses both order strictly, the fraction they order the same way (the
  paper's 72.6% between training labelers). Pairs either ties are not counted.
- ``gold_agreement`` (only when every prompt is one of the embedded task's): the same
  against the order of :func:`~rlhf_jax.tasks.gold_score`, per labeler and overall.
- ``flag_rates``: the fraction of labeled responses with each metadata flag.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from rlhf_jax.labeling.storage import FLAGS, LabelStore
from rlhf_jax.tasks import pairwise_agreement


def _gold_ranks(prompt: str, responses: list[str]) -> list[int] | None:
    """:func:`rlhf_jax.tasks.gold_ranks`, or None if ``prompt`` is not a task prompt."""
    from rlhf_jax.tasks import gold_ranks

    try:
        return gold_ranks(prompt, responses)
    except ValueError:  # not one of the embedded task's prompts
        return None


def label_stats(store: LabelStore) -> dict[str, Any]:
    """Agreement numbers over every labeler's file (see the module docstring); agreement
    values are None where no pair could be compared."""
    labels = {name: store.labels(name) for name in store.labelers()}
    pair_counts: dict[str, list[int]] = {}
    total = np.zeros(2, np.int64)
    for a, b in itertools.combinations(sorted(labels), 2):
        counts = np.zeros(2, np.int64)
        for item_id in labels[a].keys() & labels[b].keys():
            counts += pairwise_agreement(labels[a][item_id]["ranks"], labels[b][item_id]["ranks"])
        pair_counts[f"{a}/{b}"] = counts.tolist()
        total += counts

    gold_cache: dict[str, list[int] | None] = {}
    gold: dict[str, list[int]] | None = {}
    flag_counts, n_responses = dict.fromkeys(FLAGS, 0), 0
    for name, records in labels.items():
        counts = np.zeros(2, np.int64)
        for item_id, record in records.items():
            n_responses += len(record["responses"])
            for flag in FLAGS:
                flag_counts[flag] += sum(record.get("flags", {}).get(flag, []))
            if gold is None:
                continue
            if item_id not in gold_cache:
                gold_cache[item_id] = _gold_ranks(record["prompt"], record["responses"])
            if gold_cache[item_id] is None:
                gold = None  # not the embedded task: no gold scorer to compare with
                continue
            counts += pairwise_agreement(record["ranks"], gold_cache[item_id])
        if gold is not None:
            gold[name] = counts.tolist()

    def fraction(counts) -> float | None:
        return float(counts[0] / counts[1]) if counts[1] else None

    out: dict[str, Any] = {
        "labelers": {name: len(records) for name, records in labels.items()},
        "inter_labeler_agreement": fraction(total), "inter_labeler_pairs": int(total[1]),
        "by_labeler_pair": {k: {"agreement": fraction(v), "pairs": v[1]} for k, v in pair_counts.items()},
        "flag_rates": {f: (c / n_responses if n_responses else None) for f, c in flag_counts.items()},
    }
    if gold:
        all_gold = np.sum(list(gold.values()), axis=0)
        out["gold_agreement"] = fraction(all_gold)
        out["gold_pairs"] = int(all_gold[1])
        out["gold_agreement_by_labeler"] = {k: fraction(v) for k, v in gold.items()}
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """The ``--stats`` printout: one fact a line."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = ["labels per labeler: " + (", ".join(f"{k} {v}" for k, v in stats["labelers"].items()) or "none yet")]
    lines.append(f"inter-labeler agreement: {pct(stats['inter_labeler_agreement'])} of "
                 f"{stats['inter_labeler_pairs']} response pairs both ordered (paper: 72.6%)")
    lines += [f"  {k}: {pct(v['agreement'])} of {v['pairs']}" for k, v in stats["by_labeler_pair"].items()]
    if "gold_agreement" in stats:
        lines.append(f"agreement with the gold scorer: {pct(stats['gold_agreement'])} of {stats['gold_pairs']} pairs")
        lines += [f"  {k}: {pct(v)}" for k, v in stats["gold_agreement_by_labeler"].items()]
    lines.append("flag rates: " + ", ".join(f"{k} {pct(v)}" for k, v in stats["flag_rates"].items()))
    return "\n".join(lines)
