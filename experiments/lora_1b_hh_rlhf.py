"""A 1B Llama-family model (default shape: Llama-3.2-1B) with LoRA through SFT, RM and PPO on
Anthropic HH-RLHF, on one GPU (24 GB and up) or a TPU slice: the same file, parameters split
over every device (``fsdp``), bf16 weights and compute, rematerialised scanned layers.

Where things go (environment variables):
- weights: ``$RLHF_JAX_MODEL_DIR`` (default ``~/models/llama-1b``), a HF directory with tokenizer
  files (``--from-gguf`` converts a GGUF file into one).
- data: ``$RLHF_JAX_DATA_DIR`` (default ``~/data/hh``) as
  ``rlhf-jax data convert --format hh-rlhf --chosen-as-demonstrations --out ~/data/hh hh-rlhf/``
  writes it: ``{train,test}/{demonstrations,comparisons,prompts}.jsonl`` (add
  ``--prompt-style chat`` for an instruct model with a chat template).

Memory (docs/lora.md): PPO holds the policy's frozen weights once (its KL reference is the
same weights with the adapters off), the RM and the value model's frozen base, and optimiser
state for the adapters and the value head only: 3 x 2.5 GB of bf16 weights for a 1.24B model,
where full fine-tuning in f32 would hold ~9 copies' worth (policy, reference, EMA, RM, value,
and Adam's two moments for policy and value).

    rlhf-jax sft --config experiments/lora_1b_hh_rlhf.py --workdir runs/hh_1b
    rlhf-jax rm --workdir runs/hh_1b && rlhf-jax ppo --workdir runs/hh_1b
"""

import dataclasses
import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, GenerationConfig, LoRAConfig, MeshConfig, ModelConfig, OptimConfig,
                             PPOConfig, RMConfig, SamplingConfig, SFTConfig, TokenizerConfig)

LLAMA_1B = ModelConfig(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       head_dim=64, d_ff=8192, max_len=2048, tie_embeddings=True, rope_theta=500000.0)
ADAPTERS = LoRAConfig(rank=16, alpha=32.0, dropout=0.05, target_modules=("all-linear",))


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/llama-1b")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/hh")).expanduser()
    if (model_dir / "config.json").exists():
        from rlhf_jax.models.hf_config import model_config_from_hf

        model = model_config_from_hf(model_dir)
    else:
        model = LLAMA_1B
    model = dataclasses.replace(model, hf_path=str(model_dir), lora=ADAPTERS, param_dtype="bfloat16",
                                compute_dtype="bfloat16", remat=True, scan_layers=True, vocab_pad_multiple=128)
    seq, prompt = min(1024, model.max_len), min(512, model.max_len // 2)
    path = lambda split, kind: str(data / split / f"{kind}.jsonl")  # noqa: E731
    ckpt = CheckpointConfig(save_every=500, keep=2)
    return Config(
        name="lora_1b_hh_rlhf",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=path("train", "demonstrations"),
                                      val_path=path("test", "demonstrations"), batch_size=32, max_len=seq),
                      optim=OptimConfig(learning_rate=2e-4, warmup_steps=50), epochs=1, eval_every=500,
                      log_every=20, checkpoint=ckpt),
        rm=RMConfig(data=DataConfig(train_path=path("train", "comparisons"), val_path=path("test", "comparisons"),
                                    batch_size=32, max_len=seq),
                    optim=OptimConfig(learning_rate=1e-4), k_max=2, epochs=1, log_every=20,
                    normalize_path=path("test", "demonstrations"), checkpoint=ckpt),
        ppo=PPOConfig(prompts=DataConfig(train_path=path("train", "prompts"), val_path=path("test", "prompts"),
                                         batch_size=64, max_len=prompt),
                      pretrain=DataConfig(train_path="task:pretrain", val_path=None),  # no PPO-ptx here
                      policy_optim=OptimConfig(learning_rate=5e-5, final_lr_fraction=1.0),
                      value_optim=OptimConfig(learning_rate=5e-5, final_lr_fraction=1.0),
                      iterations=400, minibatch_size=16, kl_coef=0.05, eval_every=25,
                      checkpoint=CheckpointConfig(save_every=25, keep=2)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=256, temperature=1.0)),
    )
