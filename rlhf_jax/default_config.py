"""The embedded default: a tiny model on the embedded synthetic task, sized so the whole
pipeline runs in minutes on a 2-core CPU. ``experiments/tiny_cpu.py`` returns it; the CLI
uses it when no ``--config`` is given."""

from __future__ import annotations

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                             OptimConfig, SFTConfig, TokenizerConfig)

# Task prompts are at most 18 tokens and responses 12 (+ EOS): 32 fits every example.
TASK_MAX_LEN = 32


def default_config() -> Config:
    return Config(
        name="tiny_cpu",
        seed=0,
        model=ModelConfig(family="llama", vocab_size=152, d_model=128, n_layers=2, n_heads=4,
                          n_kv_heads=2, d_ff=384, max_len=64, tie_embeddings=True),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        tokenizer=TokenizerConfig(kind="task"),
        sft=SFTConfig(
            data=DataConfig(train_path="task:demonstrations", val_path="task:demonstrations_val",
                            batch_size=32, max_len=TASK_MAX_LEN),
            optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, final_lr_fraction=0.1),
            checkpoint=CheckpointConfig(save_every=100, keep=2),
            epochs=4, dropout=0.1, eval_every=100, log_every=10),
    )
