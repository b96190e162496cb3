"""The LoRA experiments read converted data from the user's directory and a HF model's
architecture; the 1B UltraFeedback one (bf16 frozen base, float32 adapters, K = 4 rankings,
parameters split over fsdp) runs 2 steps of each stage on a tiny local checkpoint."""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.config import load_experiment  # noqa: E402
from rlhf_jax.stages.ppo import run_ppo  # noqa: E402
from rlhf_jax.stages.rm import run_rm  # noqa: E402
from rlhf_jax.stages.sft import run_sft  # noqa: E402
from rlhf_jax.tasks import save_tokenizer  # noqa: E402
from tests.helpers import write_demonstrations, write_marker_comparisons  # noqa: E402
from tests.test_experiments import _small  # noqa: E402

EXPERIMENTS = {  # experiment -> (split names, its data kinds: (directory, file) by stage)
    "smollm2_lora_cpu": (("train", "val"), {"sft": ("sft", "demonstrations"), "rm": ("prefs", "comparisons"),
                                            "ppo": ("prompts", "prompts")}),
    "lora_1b_hh_rlhf": (("train", "test"), {"sft": ("", "demonstrations"), "rm": ("", "comparisons"),
                                            "ppo": ("", "prompts")}),
    "lora_1b_ultrafeedback": (("train", "test"), {"sft": ("sft", "demonstrations"),
                                                  "rm": ("rankings", "comparisons"), "ppo": ("prompts", "prompts")}),
}


def _tiny_model(directory, tmp_path):
    config = transformers.LlamaConfig(vocab_size=168, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, eos_token_id=1, bos_token_id=3)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for f in save_tokenizer(tmp_path / "tokenizer").iterdir():  # the task's word-level HF tokenizer
        shutil.copy(f, directory / f.name)


def _write_data(data, experiment):
    """The layout ``rlhf-jax data convert`` writes: ``[kind/]<split>/<file>.jsonl``."""
    splits, kinds = EXPERIMENTS[experiment]
    for split, seed in zip(splits, (0, 1)):
        demos = [json.loads(line) for line in write_demonstrations(data / "d.jsonl", 24, seed=seed).read_text()
                 .splitlines()]
        k = 4 if experiment == "lora_1b_ultrafeedback" else 2
        rankings = [json.loads(line) for line in write_marker_comparisons(data / "c.jsonl", 48, seed=seed).read_text()
                    .splitlines()]
        records = {"demonstrations": demos, "prompts": [{"prompt": d["prompt"]} for d in demos],
                   "comparisons": [c for c in rankings if len(c["responses"]) <= k]}
        for directory, name in kinds.values():
            path = data / directory / split / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records[name]))


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_lora_experiment_reads_the_users_model_and_data(experiment, tmp_path, monkeypatch):
    _tiny_model(tmp_path / "model", tmp_path)
    monkeypatch.setenv("RLHF_JAX_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("RLHF_JAX_DATA_DIR", str(tmp_path / "data"))
    cfg = load_experiment(f"experiments/{experiment}.py").validate()
    assert cfg.model.d_model == 32 and cfg.model.hf_path == str(tmp_path / "model")  # read from the checkpoint
    assert cfg.model.lora.rank == 16 and cfg.tokenizer.path == str(tmp_path / "model")
    splits, kinds = EXPERIMENTS[experiment]
    for stage, data in (("sft", cfg.sft.data), ("rm", cfg.rm.data), ("ppo", cfg.ppo.prompts)):
        directory, name = kinds[stage]
        assert (data.train_path, data.val_path) == tuple(
            str(tmp_path / "data" / directory / split / f"{name}.jsonl") for split in splits)


@pytest.mark.slow
def test_lora_1b_ultrafeedback_runs_two_steps_of_each_stage(tmp_path, monkeypatch, eight_devices):
    _tiny_model(tmp_path / "model", tmp_path)
    _write_data(tmp_path / "data", "lora_1b_ultrafeedback")
    monkeypatch.setenv("RLHF_JAX_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("RLHF_JAX_DATA_DIR", str(tmp_path / "data"))
    cfg = _small(load_experiment("experiments/lora_1b_ultrafeedback.py"))
    assert cfg.model.param_dtype == "bfloat16" and cfg.rm.k_max == 4
    workdir = tmp_path / "run"
    assert run_sft(cfg, workdir, show_progress=False) is not None
    assert run_rm(cfg, workdir, show_progress=False) is not None
    assert run_ppo(cfg, workdir, show_progress=False) is not None
    assert (workdir / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
