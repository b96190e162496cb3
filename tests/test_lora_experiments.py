"""The LoRA experiments read converted data from the user's directory (the layout ``rlhf-jax
data convert`` writes) and a HF model's architecture. (How LoRA runs through the stages, with
a bfloat16 frozen base, scanned and rematerialised layers: tests/stages/test_lora_stages.py.)"""

import pytest
import transformers

from rlhf_jax.config import load_experiment

EXPERIMENTS = {  # experiment -> (split names, its data kinds: (directory, file) by stage)
    "smollm2_lora_cpu": (("train", "val"), {"sft": ("sft", "demonstrations"), "rm": ("prefs", "comparisons"),
                                            "ppo": ("prompts", "prompts")}),
    "lora_1b_hh_rlhf": (("train", "test"), {"sft": ("", "demonstrations"), "rm": ("", "comparisons"),
                                            "ppo": ("", "prompts")}),
    "lora_1b_ultrafeedback": (("train", "test"), {"sft": ("sft", "demonstrations"),
                                                  "rm": ("rankings", "comparisons"), "ppo": ("prompts", "prompts")}),
}


def _tiny_config(directory):
    """A tiny Llama's ``config.json`` (all an experiment reads of the model directory)."""
    transformers.LlamaConfig(vocab_size=168, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True).save_pretrained(directory)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_lora_experiment_reads_the_users_model_and_data(experiment, tmp_path, monkeypatch):
    _tiny_config(tmp_path / "model")
    monkeypatch.setenv("RLHF_JAX_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("RLHF_JAX_DATA_DIR", str(tmp_path / "data"))
    cfg = load_experiment(f"experiments/{experiment}.py").validate()
    assert cfg.model.d_model == 32 and cfg.model.hf_path == str(tmp_path / "model")  # read from the checkpoint
    assert cfg.model.lora.rank == 16 and cfg.tokenizer.path == str(tmp_path / "model")
    splits, kinds = EXPERIMENTS[experiment]
    for stage, data in (("sft", cfg.sft.data), ("rm", cfg.rm.data), ("ppo", cfg.ppo.prompts)):
        directory, name = kinds[stage]
        # PPO's held-out prompts: its own periodic evaluation's, or (none there) rlhf-jax evaluate's
        val_path = data.val_path or (cfg.generation.prompts.val_path if stage == "ppo" else None)
        assert (data.train_path, val_path) == tuple(
            str(tmp_path / "data" / directory / split / f"{name}.jsonl") for split in splits)

