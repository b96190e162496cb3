"""``rlhf-jax label --stats`` / the lead's view numbers, ``--merge``, and the README's RM
command on the merged labels."""

import json
import re
import shlex

import numpy as np
import pytest
from werkzeug.test import Client

from rlhf_jax import cli
from rlhf_jax.data import read_records
from rlhf_jax.labeling import LabelApp, LabelStore, label_stats
from rlhf_jax.labeling.assign import display_order
from rlhf_jax.labeling.command import prepare_items
from tests.helpers import REPO
from tests.labeling_helpers import ADMIN_TOKEN, K, make_run_items, submission


def strict_pairs(a, b):
    """(agreeing, compared) over the response pairs both rankings order strictly, counted here
    pair by pair (the module under test uses tasks.pairwise_agreement)."""
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K) if a[i] != a[j] and b[i] != b[j]]
    return sum(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j]) for i, j in pairs), len(pairs)


def test_stats_on_a_constructed_example(tmp_path, capsys):
    from rlhf_jax.tasks import gold_ranks

    workdir = tmp_path / "run"
    items = make_run_items(workdir, n=4, overlap=2)  # items 0 and 1 are the overlap set
    store = LabelStore(workdir / "labels")
    gold = [gold_ranks(i["prompt"], i["responses"]) for i in items]
    shown = display_order("ben", "1", K)
    kept = [0] * K  # ranks that keep ben's shown order of item 1: shown[p] gets rank p
    for position, response in enumerate(shown):
        kept[response] = position
    # item 0: ann follows gold, ben reverses it (no compared pair agrees); item 1: both keep
    # ben's shown order (6 of 6); item 2 (not overlap): one pair swapped (5 of 6); item 3: ann only.
    ann = {"0": gold[0], "1": kept, "2": [0, 1, 2, 3], "3": [0, 0, 1, 1]}
    ben = {"0": [max(gold[0]) - r for r in gold[0]], "1": kept, "2": [0, 1, 3, 2]}
    seconds = {"ann": [10, 20, 30, 40], "ben": [5, 7, 30]}
    client = Client(LabelApp(store, items, admin_token=ADMIN_TOKEN))
    for name, labels in (("ann", ann), ("ben", ben)):
        for (item_id, ranks), time in zip(labels.items(), seconds[name]):
            flagged = "fails_constraint" if name == "ann" else None
            # ann's ratings follow her ranks (7 - rank); ben rates everything 4 (no pair to compare)
            ratings = [7 - r for r in ranks] if name == "ann" else [4] * K
            body = submission(name, item_id, ranks, flagged, ratings, seconds=time)
            assert client.post("/api/label", json=body).status_code == 200
    assert client.post("/api/skip", json={"labeler": "ben", "item_id": "3", "reason": "later"}).status_code == 200
    assert client.post("/api/skip", json={"labeler": "cy", "item_id": "3", "reason": "cant_judge",
                                          "note": "no idea"}).status_code == 200
    stats = label_stats(store, items)

    n0 = strict_pairs(gold[0], gold[0])[1]  # gold's strictly ordered pairs on item 0
    assert stats["labelers"] == {"ann": 4, "ben": 3, "cy": 0}
    assert stats["inter_labeler_pairs"] == n0 + 12
    assert stats["inter_labeler_agreement"] == pytest.approx(11 / (n0 + 12))
    assert stats["by_labeler_pair"]["ann/ben"] == {"agreement": pytest.approx(11 / (n0 + 12)), "pairs": n0 + 12}
    for name in ("ann", "ben"):  # the overlap set only: items 0 and 1
        assert stats["agreement_with_others"][name] == {"agreement": pytest.approx(6 / (n0 + 6)), "pairs": n0 + 6}
    assert stats["agreement_with_others"]["cy"] == {"agreement": None, "pairs": 0}
    assert [(row["item_id"], row["agreement"]) for row in stats["most_disagreement"]] == [
        ("0", 0.0), ("2", pytest.approx(5 / 6)), ("1", 1.0)]
    assert stats["most_disagreement"][0]["ranks"] == {"ann": gold[0], "ben": ben["0"]}

    ann_p, ben_p = stats["progress"]["ann"], stats["progress"]["ben"]
    assert (ann_p["seconds_median"], ann_p["seconds_mean"]) == (25, 25)
    assert (ben_p["seconds_median"], ben_p["seconds_mean"]) == (7, 14)
    assert ann_p["ratings_agree_with_ranking"] == 1.0 and ben_p["ratings_agree_with_ranking"] is None

    def kept_order(name, item_id, ranks):
        order = display_order(name, item_id, K)
        return [ranks[r] for r in order] == sorted(ranks) and len(set(ranks)) == K

    for name, labels, p in (("ann", ann, ann_p), ("ben", ben, ben_p)):
        assert p["kept_shown_order"] == pytest.approx(np.mean([kept_order(name, i, r) for i, r in labels.items()]))
        first_best = [r[display_order(name, i, K)[0]] == min(r) for i, r in labels.items()]
        assert p["first_shown_ranked_best"] == pytest.approx(np.mean(first_best))
    assert ben_p["kept_shown_order"] >= 1 / 3  # item 1 at least
    # ann: items 0, 1 (overlap) and 2, 3 labeled; ben: 0, 1, 2, and 3 skipped for later, but
    # ann has labeled 3 since (not an overlap item): nothing left for him
    assert (ann_p["labeled"], ann_p["skipped"], ann_p["to_do"], ann_p["overlap_labeled"]) == (4, 0, 0, 2)
    assert (ben_p["labeled"], ben_p["skipped"], ben_p["skipped_for_later"], ben_p["to_do"]) == (3, 0, 1, 0)
    cy = stats["progress"]["cy"]
    assert (cy["labeled"], cy["skipped"], cy["to_do"]) == (0, 1, 2)  # the overlap items 0 and 1 are left
    assert [(s["labeler"], s["item_id"], s["reason"], s["note"]) for s in stats["skips"]] == [
        ("ben", "3", "later", ""), ("cy", "3", "cant_judge", "no idea")]

    want = {name: np.sum([strict_pairs(labels[i], gold[int(i)]) for i in labels], axis=0)
            for name, labels in (("ann", ann), ("ben", ben))}
    assert stats["gold_agreement_by_labeler"]["ann"] == pytest.approx(want["ann"][0] / want["ann"][1])
    assert stats["gold_agreement_by_labeler"]["ben"] == pytest.approx(want["ben"][0] / want["ben"][1])
    assert want["ann"][0] >= n0 and want["ben"][0] < want["ben"][1]  # the example says something
    # ann flagged the first response of each of her 4 items; 28 responses labeled in all
    assert stats["flag_rates"]["fails_constraint"] == pytest.approx(4 / 28)
    assert stats["flag_rates"]["hallucination"] == 0.0

    assert client.get("/api/admin", headers={"X-Label-Token": ADMIN_TOKEN}).json["most_disagreement"][0][
        "item_id"] == "0"
    assert cli.main(["label", "--stats", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for line in ("items: 4 (2 in the overlap set", "inter-labeler agreement", "agreement with the gold scorer",
                 "ann: 4 labeled, 0 skipped, 0 to do; per item median 25 s, mean 25 s",
                 "agreement with the others on the overlap set: ann", "most disagreement: item 0 0.0%",
                 "skip: cy item 3: cant_judge (no idea)"):
        assert line in out, (line, out)


@pytest.mark.parametrize("prompt", ["Say hi", [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Say hi"}]], ids=["text", "conversation"])
def test_stats_without_the_embedded_task_has_no_gold(tmp_path, prompt):
    workdir = tmp_path / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt, "responses": ["hi", "hello", "hey"]}) + "\n")
    items = prepare_items(None, workdir, str(prompts), None, 3, 100, 1)
    client = Client(LabelApp(LabelStore(workdir / "labels"), items))
    assert client.get("/api/queue?labeler=ann").json["items"][0]["prompt"] == prompt
    for name, ranks in (("ann", [0, 1, 2]), ("ben", [0, 2, 1])):
        body = {"labeler": name, "item_id": "0", "ranks": ranks, "ratings": [4, 4, 4]}
        assert client.post("/api/label", json=body).status_code == 200
    stats = label_stats(LabelStore(workdir / "labels"))
    assert stats["inter_labeler_agreement"] == pytest.approx(2 / 3) and "gold_agreement" not in stats
    assert stats["most_disagreement"][0]["prompt"] == prompt
    assert [r["prompt"] for _, r in read_records(workdir / "labels" / "ann.jsonl", "comparisons")] == [prompt]


def test_merge_writes_every_labelers_comparisons_for_the_rm(tmp_path, capsys):
    workdir = tmp_path / "run"
    items = make_run_items(workdir, n=3, overlap=3)
    store = LabelStore(workdir / "labels")
    client = Client(LabelApp(store, items))
    for name, labels in (("ann", {"0": [0, 1, 2, 3], "1": [3, 2, 1, 0], "2": [0, 0, 1, 1]}),
                         ("ben", {"0": [1, 0, 2, 3], "1": [0, 1, 2, 3]})):
        for item_id, ranks in labels.items():
            assert client.post("/api/label", json=submission(name, item_id, ranks, None)).status_code == 200
    assert client.post("/api/skip", json={"labeler": "cy", "item_id": "0", "reason": "broken"}).status_code == 200
    assert cli.main(["label", "--merge", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "5 comparisons from 2 labelers (ann, ben)" in out  # cy only skipped: no comparisons
    assert f"rlhf-jax rm --workdir {workdir} --rm.data.train_path=run:labels/merged/comparisons.jsonl" in out
    assert "--rm.init_from=None" in out and "at least 8 comparisons" in out  # no SFT export here; 5 < a batch
    merged = workdir / "labels" / "merged" / "comparisons.jsonl"
    assert len(read_records(merged, "comparisons")) == 5  # the RM's own reader accepts it
    records = [json.loads(line) for line in merged.read_text().splitlines()]  # whole, flags and all
    assert [(r["labeler"], r["item_id"], r["ranks"]) for r in records] == [
        ("ann", "0", [0, 1, 2, 3]), ("ann", "1", [3, 2, 1, 0]), ("ann", "2", [0, 0, 1, 1]),
        ("ben", "0", [1, 0, 2, 3]), ("ben", "1", [0, 1, 2, 3])]
    assert store.labelers() == ["ann", "ben", "cy"]  # the merged file is nobody's labels
    # a damaged line in one labeler's file is named there, and the merged file is left as it was
    ben = workdir / "labels" / "ben.jsonl"
    lines = ben.read_text().splitlines()
    ben.write_text(lines[0] + "\n" + '{"prompt": "x", "responses": ["a"], "ranks": [0, 1]}\n' + lines[1] + "\n")
    before = merged.read_bytes()
    assert cli.main(["label", "--merge", "--workdir", str(workdir)]) == 2
    assert f"{ben}:2" in capsys.readouterr().err
    assert merged.read_bytes() == before


def readme_labeling_commands() -> list[str]:
    """The shell commands of the README's labeling section, as written."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Labeling comparisons by hand", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("rlhf-jax ")]


@pytest.mark.slow  # trains the README's reward model (the embedded default config) for 2 steps (~30 s)
def test_the_readme_rm_command_trains_on_merged_labels_in_a_fresh_run_directory(tmp_path, monkeypatch, capsys):
    """Two labelers, then the README's --merge and rm commands as written (with its run
    directory here), in a run directory that holds nothing but the labels."""
    commands = readme_labeling_commands()
    merge = next(c for c in commands if "--merge" in c)
    rm = next(c for c in commands if c.startswith("rlhf-jax rm "))
    monkeypatch.chdir(tmp_path)  # the README's runs/x, relative, here
    workdir = tmp_path / "runs" / "x"
    items = make_run_items(workdir, n=6, overlap=2)
    client = Client(LabelApp(LabelStore(workdir / "labels"), items))
    rng = np.random.default_rng(0)
    for name in ("ann", "ben"):
        for item in client.get(f"/api/queue?labeler={name}").json["items"][:4]:  # 2 overlap + 2 each
            ranks = [int(r) for r in rng.permutation(K)]
            assert client.post("/api/label", json=submission(name, item["id"], ranks)).status_code == 200
    assert cli.main(shlex.split(merge)[1:]) == 0
    assert f"rlhf-jax rm --workdir runs/x" in capsys.readouterr().out
    assert cli.main(shlex.split(rm)[1:]) == 0, capsys.readouterr().err
    assert (workdir / "rm" / "export" / "export.json").is_file()
