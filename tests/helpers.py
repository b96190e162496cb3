"""Small configs and data for stage tests: tiny models on a few task examples."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                             OptimConfig, SFTConfig, TokenizerConfig)

TINY_MODEL = ModelConfig(family="llama", vocab_size=152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_len=64, tie_embeddings=False)


def write_demonstrations(path: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """``n`` correct demonstrations of the embedded task."""
    from rlhf_jax.tasks import generate_prompt, solve

    rng = np.random.default_rng(seed)
    records = []
    while len(records) < n:
        prompt = generate_prompt(rng)
        response = solve(prompt)
        if response:
            records.append({"prompt": prompt, "response": response})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_config(train_path, val_path=None, *, steps=8, batch_size=8, mesh=MeshConfig(data=-1),
                lr=3e-3, save_every=4, dropout=0.0, seed=0, model=TINY_MODEL, accum=1) -> Config:
    return Config(
        name="test", seed=seed, model=model, mesh=mesh, tokenizer=TokenizerConfig(kind="task"),
        sft=SFTConfig(
            data=DataConfig(train_path=str(train_path), val_path=str(val_path) if val_path else None,
                            batch_size=batch_size, max_len=32),
            optim=OptimConfig(learning_rate=lr, grad_accum_steps=accum),
            checkpoint=CheckpointConfig(save_every=save_every, keep=2),
            epochs=1000, max_steps=steps, dropout=dropout, eval_every=steps, log_every=2),
    )


def write_experiment(cfg: Config, path: pathlib.Path) -> pathlib.Path:
    """An experiment file whose get_config() returns ``cfg`` (frozen dataclass reprs are code)."""
    path.write_text(f"from rlhf_jax.config import *\n\n\ndef get_config():\n    return {cfg!r}\n")
    return path
