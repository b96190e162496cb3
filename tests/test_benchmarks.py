"""The benchmark entry runs end to end (quick workloads, our side only: no torch or trl)."""

import json
import math

from benchmarks import run


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_ours_only_writes_finite_results_and_never_recompiles(tmp_path):
    run.main(["--quick", "--ours-only", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    for section in ("sft", "decode", "ppo"):
        assert json.loads((tmp_path / f"{section}.json").read_text()) == results[section]
    numbers = dict(_numbers(results))
    assert not [path for path, value in numbers.items() if not math.isfinite(value)]

    assert results["sft"]["ours"]["tokens_per_s"] > 0
    assert 0 < results["sft"]["ours"]["fraction_of_matmul_peak"] < 1.5
    assert {(row["model"], row["batch"]) for row in results["decode"]["rows"]} == {
        (model, batch) for model in ("gpt2-2L-d128 (quick)", "tiny-default") for batch in (1, 4)}
    assert all(row["ours"]["tokens_per_s"] > 0 for row in results["decode"]["rows"])
    phases = results["ppo"]["ours"]
    assert phases["iteration_s"] >= phases["rollout_s"] + phases["scoring_s"] + phases["update_s"] > 0
    # the sft step, the four samplers and the three PPO steps
    assert len(results["compiles_after_warmup"]) == 6
    assert results["compiles_after_warmup"] == {name: 0 for name in results["compiles_after_warmup"]}

    assert results["sft"]["torch_loop"] == {"skipped": "--ours-only"}
    table = (tmp_path / "table.md").read_text()
    assert "| Compiles after warm-up" in table and "skipped: --ours-only" in table
