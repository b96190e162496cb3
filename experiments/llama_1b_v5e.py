"""A TinyLlama-1.1B-shaped model (22 layers, d_model 2048, 32 query / 4 kv heads, d_ff 5632,
vocabulary 32000) through SFT, the RM and PPO-ptx on a v5e-16 slice (16 chips, 4 hosts), at
4 x 2048 tokens per chip in every train step: the full PPO setup (policy, reference, reward
and value models, all 1.1B). Checked on a CPU host before any TPU is booked:

    rlhf-jax compile --config experiments/llama_1b_v5e.py --topology v5e-16 --json runs/llama_1b_v5e16.json
    # the same per-chip batch on one v5e:2x2 host (4 chips): a quarter of each global batch
    rlhf-jax compile --config experiments/llama_1b_v5e.py --topology v5e:2x2 --stages sft,ppo \\
        --sft.data.batch_size=16 --ppo.prompts.batch_size=64 --ppo.minibatch_size=16 --ppo.pretrain.batch_size=16

Weights and data as in ``experiments/llama_tpu_pod.py`` (``$RLHF_JAX_MODEL_DIR``, a HF
Llama directory; ``$RLHF_JAX_DATA_DIR``); without a checkpoint the model starts fresh.
Parameters and Adam in f32, split over all chips (FSDP); compute in bf16; every block
rematerialised (``remat="full"``); splash attention on the TPU.
"""

import dataclasses
import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, GenerationConfig, MeshConfig, ModelConfig,
                             OptimConfig, PPOConfig, RMConfig, SamplingConfig, SFTConfig, TokenizerConfig)

LLAMA_1B = ModelConfig(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                       d_ff=5632, max_len=2048, tie_embeddings=False, compute_dtype="bfloat16", remat="full",
                       scan_layers=True)
CHIPS = 16
SEQ, PROMPT = 2048, 1024


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/tinyllama")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/instruct")).expanduser()
    model = dataclasses.replace(LLAMA_1B, hf_path=str(model_dir) if (model_dir / "config.json").exists() else None)
    jsonl = lambda name: str(data / f"{name}.jsonl")  # noqa: E731
    per_chip = 4  # rows of SEQ tokens per chip in each train step
    return Config(
        name="llama_1b_v5e",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=jsonl("sft_train"), val_path=jsonl("sft_val"),
                                      batch_size=per_chip * CHIPS, max_len=SEQ, packing=True),
                      optim=OptimConfig(learning_rate=2e-5, warmup_steps=100), epochs=4, dropout=0.1,
                      checkpoint=CheckpointConfig(save_every=500, keep=3), eval_every=500, log_every=20),
        # one prompt's K = 4 responses of up to SEQ tokens are 4 rows: a prompt per chip
        rm=RMConfig(data=DataConfig(train_path=jsonl("comparisons_train"), val_path=jsonl("comparisons_val"),
                                    batch_size=CHIPS, max_len=SEQ),
                    optim=OptimConfig(learning_rate=9e-6), k_max=4, epochs=1, normalize_path=jsonl("sft_val"),
                    checkpoint=CheckpointConfig(save_every=500, keep=3)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=SEQ - PROMPT, temperature=1.0),
                                    prompts=DataConfig(train_path=jsonl("prompts_train"),
                                                       val_path=jsonl("prompts_val"), batch_size=256, max_len=PROMPT)),
        ppo=PPOConfig(prompts=DataConfig(train_path=jsonl("prompts_train"), val_path=jsonl("prompts_val"),
                                         batch_size=256, max_len=PROMPT),
                      pretrain=DataConfig(train_path=jsonl("pretrain_train"), val_path=jsonl("pretrain_val"),
                                          batch_size=per_chip * CHIPS, max_len=SEQ),
                      policy_optim=OptimConfig(learning_rate=9.65e-6, final_lr_fraction=1.0),
                      value_optim=OptimConfig(learning_rate=5e-6, final_lr_fraction=1.0),
                      iterations=256, minibatch_size=per_chip * CHIPS, epochs=1, kl_coef=0.02, ptx_coef=27.8,
                      eval_every=16, checkpoint=CheckpointConfig(save_every=8, keep=3)),
    )
