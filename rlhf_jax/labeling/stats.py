"""What a lead needs to know about the labels: ``rlhf-jax label --stats`` and the ``/admin`` page.

Agreement is always over response pairs that both rankings order strictly (a tie in either
is not counted), as a fraction that order the pair the same way (the paper: 72.6% between
training labelers):

- ``inter_labeler_agreement``: every item two labelers both labeled, every pair of labelers.
- ``agreement_with_others``: per labeler, on the overlap items, against every other labeler.
- ``by_labeler_pair``: per pair of labelers.
- ``most_disagreement``: the items whose labelers agree least.
- ``gold_agreement`` (only when every prompt is one of the embedded task's): against the
  order of :func:`~rlhf_jax.tasks.gold_score`, per labeler and overall.

Per labeler (``progress``): labeled, skipped (with reasons under ``skips``), still to do,
seconds per item, and two position-bias signs: how often the ranking kept the order the
page showed, and how often the first response shown was ranked best (chance: 1/K).
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import numpy as np

from rlhf_jax.labeling.assign import visible_items
from rlhf_jax.labeling.storage import FLAGS, RATING_SCALE, LabelStore
from rlhf_jax.tasks import pairwise_agreement

MOST_DISAGREEMENT = 10  # items listed


def _fraction(counts) -> float | None:
    return float(counts[0] / counts[1]) if counts[1] else None


def _gold_ranks(prompt: str | list, responses: list[str]) -> list[int] | None:
    """:func:`rlhf_jax.tasks.gold_ranks`, or None if ``prompt`` is not a task prompt (or is a
    conversation)."""
    from rlhf_jax.tasks import gold_ranks

    if not isinstance(prompt, str):
        return None
    try:
        return gold_ranks(prompt, responses)
    except ValueError:  # not one of the embedded task's prompts
        return None


def _is_permutation(order: Any, k: int) -> bool:
    return isinstance(order, list) and sorted(order) == list(range(k))


def _are_ratings(ratings: Any, k: int) -> bool:
    return isinstance(ratings, list) and len(ratings) == k and all(
        isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= RATING_SCALE for x in ratings)


def _kept_shown_order(record: dict[str, Any]) -> bool:
    order = record["display_order"]
    return all(record["ranks"][r] == position for position, r in enumerate(order))


def _labeler_progress(store: LabelStore, name: str, labels: dict, items: list[dict] | None,
                      labeled_by_others: set[str]) -> dict[str, Any]:
    skips = {i: s for i, s in store.skips(name).items() if i not in labels}
    skipped = {i for i, s in skips.items() if s["reason"] != "later"}
    seconds = [r["seconds"] for r in labels.values() if isinstance(r.get("seconds"), (int, float))]
    shown = [r for r in labels.values() if _is_permutation(r.get("display_order"), len(r["ranks"]))]
    rated = [r for r in labels.values() if _are_ratings(r.get("ratings"), len(r["ranks"]))]
    rating_counts = np.zeros(2, np.int64)
    for r in rated:  # a higher rating should go with a better (lower) rank
        rating_counts += pairwise_agreement(r["ranks"], [RATING_SCALE - x for x in r["ratings"]])
    out = {
        "labeled": len(labels), "skipped": len(skipped), "skipped_for_later": len(skips) - len(skipped),
        "seconds_median": statistics.median(seconds) if seconds else None,
        "seconds_mean": statistics.fmean(seconds) if seconds else None,
        "kept_shown_order": (sum(map(_kept_shown_order, shown)) / len(shown)) if shown else None,
        "first_shown_ranked_best": (sum(r["ranks"][r["display_order"][0]] == 0 for r in shown) / len(shown)
                                    if shown else None),
        "ratings_agree_with_ranking": _fraction(rating_counts),
        "last_time": max((r.get("time", "") for r in [*labels.values(), *skips.values()]), default=None),
    }
    if items is not None:
        overlap = {i["id"] for i in items if i["overlap"]}
        visible = visible_items(name, items, labeled_by_others)
        out["overlap_labeled"] = len(overlap & labels.keys())
        out["to_do"] = sum(i not in labels and i not in skipped for i in visible)
    return out


def label_stats(store: LabelStore, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every number of the module docstring over the labels directory; ``items`` (the items
    file) adds the overlap set and each labeler's work left. Fractions are None where nothing
    could be compared."""
    names = store.labelers()
    labels = {name: store.labels(name) for name in names}
    overlap = {i["id"] for i in items if i["overlap"]} if items is not None else set()
    pair_counts: dict[str, np.ndarray] = {}
    with_others = {name: np.zeros(2, np.int64) for name in names}
    per_item: dict[str, np.ndarray] = {}
    for a, b in itertools.combinations(names, 2):
        counts = np.zeros(2, np.int64)
        for item_id in labels[a].keys() & labels[b].keys():
            agree = np.array(pairwise_agreement(labels[a][item_id]["ranks"], labels[b][item_id]["ranks"]))
            counts += agree
            per_item[item_id] = per_item.get(item_id, np.zeros(2, np.int64)) + agree
            if item_id in overlap:
                with_others[a] += agree
                with_others[b] += agree
        pair_counts[f"{a}/{b}"] = counts
    total = np.sum(list(pair_counts.values()), axis=0) if pair_counts else np.zeros(2, np.int64)

    taken = {name: set().union(*(labels[o].keys() for o in names if o != name)) for name in names}
    out: dict[str, Any] = {
        "items": len(items) if items is not None else None, "overlap_items": len(overlap),
        "labelers": {name: len(labels[name]) for name in names},
        "progress": {name: _labeler_progress(store, name, labels[name], items, taken[name]) for name in names},
        "inter_labeler_agreement": _fraction(total), "inter_labeler_pairs": int(total[1]),
        "agreement_with_others": {name: {"agreement": _fraction(c), "pairs": int(c[1])}
                                  for name, c in with_others.items()},
        "by_labeler_pair": {k: {"agreement": _fraction(v), "pairs": int(v[1])} for k, v in pair_counts.items()},
        "most_disagreement": _most_disagreement(labels, per_item),
        "skips": sorted(({"labeler": name, **{k: s.get(k) for k in ("item_id", "reason", "note", "time")},
                          "labeled_since": item_id in labels[name]}
                         for name in names for item_id, s in store.skips(name).items()),
                        key=lambda s: s["time"] or ""),
        "flag_rates": _flag_rates(labels),
        "problems": store.problems(),
    }
    out.update(_gold_agreement(labels))
    return out


def _most_disagreement(labels: dict[str, dict], per_item: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    for item_id, counts in per_item.items():
        if not counts[1]:
            continue
        by = {name: records[item_id] for name, records in labels.items() if item_id in records}
        first = next(iter(by.values()))
        rows.append({"item_id": item_id, "agreement": _fraction(counts), "pairs": int(counts[1]),
                     "prompt": first["prompt"], "ranks": {name: r["ranks"] for name, r in by.items()}})
    rows.sort(key=lambda row: (row["agreement"], -row["pairs"], row["item_id"]))
    return rows[:MOST_DISAGREEMENT]


def _flag_rates(labels: dict[str, dict]) -> dict[str, float | None]:
    counts, n_responses = dict.fromkeys(FLAGS, 0), 0
    for records in labels.values():
        for record in records.values():
            n_responses += len(record["responses"])
            for flag in FLAGS:
                counts[flag] += sum(bool(x) for x in record.get("flags", {}).get(flag, []))
    return {f: (c / n_responses if n_responses else None) for f, c in counts.items()}


def _gold_agreement(labels: dict[str, dict]) -> dict[str, Any]:
    """Agreement with the gold scorer, or nothing if any prompt is not the embedded task's."""
    gold_cache: dict[str, list[int] | None] = {}
    gold: dict[str, np.ndarray] = {}
    for name, records in labels.items():
        counts = np.zeros(2, np.int64)
        for item_id, record in records.items():
            if item_id not in gold_cache:
                gold_cache[item_id] = _gold_ranks(record["prompt"], record["responses"])
            if gold_cache[item_id] is None:
                return {}  # not the embedded task: no gold scorer to compare with
            counts += pairwise_agreement(record["ranks"], gold_cache[item_id])
        gold[name] = counts
    if not gold:
        return {}
    overall = np.sum(list(gold.values()), axis=0)
    return {"gold_agreement": _fraction(overall), "gold_pairs": int(overall[1]),
            "gold_agreement_by_labeler": {k: _fraction(v) for k, v in gold.items()}}


def format_stats(stats: dict[str, Any]) -> str:
    """The ``--stats`` printout: one fact a line."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def secs(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0f} s"

    lines = []
    if stats["items"] is not None:
        lines.append(f"items: {stats['items']} ({stats['overlap_items']} in the overlap set, labeled by everyone)")
    lines.append("labels per labeler: " + (", ".join(f"{k} {v}" for k, v in stats["labelers"].items()) or "none yet"))
    for name, p in stats["progress"].items():
        left = f", {p['to_do']} to do" if "to_do" in p else ""
        lines.append(f"  {name}: {p['labeled']} labeled, {p['skipped']} skipped{left}; per item median "
                     f"{secs(p['seconds_median'])}, mean {secs(p['seconds_mean'])}; kept the shown order "
                     f"{pct(p['kept_shown_order'])}, first shown ranked best {pct(p['first_shown_ranked_best'])}; "
                     f"ratings agree with ranking {pct(p['ratings_agree_with_ranking'])}")
    lines.append(f"inter-labeler agreement: {pct(stats['inter_labeler_agreement'])} of "
                 f"{stats['inter_labeler_pairs']} response pairs both ordered (paper: 72.6%)")
    lines += [f"  {k}: {pct(v['agreement'])} of {v['pairs']}" for k, v in stats["by_labeler_pair"].items()]
    lines.append("agreement with the others on the overlap set: " + (", ".join(
        f"{k} {pct(v['agreement'])} of {v['pairs']}" for k, v in stats["agreement_with_others"].items()) or "n/a"))
    if "gold_agreement" in stats:
        lines.append(f"agreement with the gold scorer: {pct(stats['gold_agreement'])} of {stats['gold_pairs']} pairs")
        lines += [f"  {k}: {pct(v)}" for k, v in stats["gold_agreement_by_labeler"].items()]
    if stats["most_disagreement"]:
        lines.append("most disagreement: " + ", ".join(
            f"item {row['item_id']} {pct(row['agreement'])} of {row['pairs']}" for row in stats["most_disagreement"]))
    for skip in stats["skips"]:
        note = f" ({skip['note']})" if skip["note"] else ""
        lines.append(f"skip: {skip['labeler']} item {skip['item_id']}: {skip['reason']}{note}"
                     + (" (labeled since)" if skip["labeled_since"] else ""))
    lines.append("flag rates: " + ", ".join(f"{k} {pct(v)}" for k, v in stats["flag_rates"].items()))
    lines += [f"unreadable line (ignored): {p}" for p in stats["problems"]]
    return "\n".join(lines)
