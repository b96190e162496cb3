"""The LoRA memory benchmark runs (quick model) and its figures are consistent."""

import json

from benchmarks import lora_memory


def test_quick_lora_memory_benchmark_writes_its_figures(tmp_path):
    result = lora_memory.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "lora_memory.json").read_text())["lora_over_full"] == result["lora_over_full"]
    full, adapted = result["full_finetuning"], result["lora_rank16"]
    assert full["trainable_params"] == full["total_params"]  # full fine-tuning trains everything
    assert adapted["total_params"] == full["total_params"] + adapted["trainable_params"]  # base + adapters
    # AdamW keeps two moments per trained parameter, nothing for frozen ones
    for row in (full, adapted):
        assert 8 * row["trainable_params"] <= row["optimizer_state_bytes"] <= 8 * row["trainable_params"] + 64
    ratios = result["lora_over_full"]
    assert ratios["optimizer_state_bytes"] < 0.5 and ratios["step_peak_memory"] < 1.0
    assert all(row["step_s"]["median_s"] > 0 and row["step_s"]["n"] == 2 for row in (full, adapted))
