"""A Llama-3-8B-shaped model (32 layers, d_model 4096, 32 query / 8 kv heads of 128, d_ff
14336, vocabulary 128256, RoPE theta 500000) fine-tuned (SFT) and trained as a reward model
on a v5p-64 slice (32 chips, 8 hosts): parameters split over FSDP 8 x tensor 4, 64 rows of
4096 tokens per step (8 rows per FSDP shard, each row's heads and MLP split over 4 chips).
Checked on a CPU host before any TPU is booked:

    rlhf-jax compile --config experiments/llama3_8b_v5p.py --topology v5p-64 --stages sft,rm

Weights and data as in ``experiments/llama_tpu_pod.py`` (``$RLHF_JAX_MODEL_DIR``, a HF
Llama-3 directory; ``$RLHF_JAX_DATA_DIR``). f32 parameters and Adam, bf16 compute, every
block rematerialised, splash attention on the TPU.
"""

import dataclasses
import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RMConfig,
                             SFTConfig, TokenizerConfig)

LLAMA3_8B = ModelConfig(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        head_dim=128, d_ff=14336, max_len=8192, tie_embeddings=False, rope_theta=500000.0,
                        compute_dtype="bfloat16", remat="full", scan_layers=True)
SEQ = 4096


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/llama3-8b")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/instruct")).expanduser()
    model = dataclasses.replace(LLAMA3_8B, hf_path=str(model_dir) if (model_dir / "config.json").exists() else None)
    jsonl = lambda name: str(data / f"{name}.jsonl")  # noqa: E731
    return Config(
        name="llama3_8b_v5p",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=4),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=jsonl("sft_train"), val_path=jsonl("sft_val"), batch_size=64,
                                      max_len=SEQ, packing=True),
                      optim=OptimConfig(learning_rate=1e-5, warmup_steps=100), epochs=2, dropout=0.0,
                      checkpoint=CheckpointConfig(save_every=500, keep=2), eval_every=500, log_every=20),
        rm=RMConfig(data=DataConfig(train_path=jsonl("comparisons_train"), val_path=jsonl("comparisons_val"),
                                    batch_size=16, max_len=SEQ),
                    optim=OptimConfig(learning_rate=5e-6), k_max=4, epochs=1, normalize_path=jsonl("sft_val"),
                    checkpoint=CheckpointConfig(save_every=500, keep=2)),
    )
