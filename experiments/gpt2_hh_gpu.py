"""GPT-2 (124M) through SFT, RM and PPO on Anthropic-HH-style data, on a local GPU.

Where things go (override with environment variables):
- weights: a local HF GPT-2 directory (``config.json``, ``model.safetensors``, tokenizer
  files), ``$RLHF_JAX_MODEL_DIR`` (default ``~/models/gpt2``); e.g. from a machine with
  network: ``huggingface-cli download openai-community/gpt2 --local-dir ~/models/gpt2``.
- data: ``$RLHF_JAX_DATA_DIR`` (default ``~/data/hh``) with
  ``sft_{train,val}.jsonl`` ({"prompt", "response"}: an HH dialogue's prompt and its chosen
  reply), ``rm_{train,val}.jsonl`` ({"prompt", "chosen", "rejected"}, as HH ships it),
  ``prompts_{train,val}.jsonl`` ({"prompt"}) and ``pretrain_{train,val}.jsonl`` ({"text"}).

Run: ``rlhf-jax sft --config experiments/gpt2_hh_gpu.py --workdir runs/gpt2_hh`` then
``rlhf-jax rm ...`` and ``rlhf-jax ppo ...`` with the same flags. bf16 compute, f32 params.
"""

import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, GenerationConfig, MeshConfig, ModelConfig,
                             OptimConfig, PPOConfig, RMConfig, SFTConfig, SamplingConfig, TokenizerConfig)

# GPT-2 small, used when the weights directory is not there yet (so the config still loads).
GPT2_SMALL = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                         max_len=1024, tie_embeddings=True)


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/gpt2")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/hh")).expanduser()
    if (model_dir / "config.json").exists():
        from rlhf_jax.models.hf_config import model_config_from_hf

        model = model_config_from_hf(model_dir)
    else:
        model = GPT2_SMALL
    import dataclasses

    model = dataclasses.replace(model, hf_path=str(model_dir), compute_dtype="bfloat16", remat=True)
    seq, prompt = min(512, model.max_len), min(256, model.max_len // 2)
    jsonl = lambda name: str(data / f"{name}.jsonl")  # noqa: E731
    return Config(
        name="gpt2_hh_gpu",
        model=model,
        mesh=MeshConfig(data=-1),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=jsonl("sft_train"), val_path=jsonl("sft_val"), batch_size=32,
                                      max_len=seq, packing=True),
                      optim=OptimConfig(learning_rate=1e-5, warmup_steps=100), epochs=2, dropout=0.1,
                      checkpoint=CheckpointConfig(save_every=500, keep=2), eval_every=500, log_every=20),
        rm=RMConfig(data=DataConfig(train_path=jsonl("rm_train"), val_path=jsonl("rm_val"), batch_size=32,
                                    max_len=seq),
                    optim=OptimConfig(learning_rate=9e-6), k_max=2, epochs=1, normalize_path=jsonl("sft_val"),
                    checkpoint=CheckpointConfig(save_every=500, keep=2)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=128, temperature=1.0),
                                    prompts=DataConfig(train_path=jsonl("prompts_train"),
                                                       val_path=jsonl("prompts_val"), batch_size=128,
                                                       max_len=prompt)),
        ppo=PPOConfig(prompts=DataConfig(train_path=jsonl("prompts_train"), val_path=jsonl("prompts_val"),
                                         batch_size=128, max_len=prompt),
                      pretrain=DataConfig(train_path=jsonl("pretrain_train"), val_path=jsonl("pretrain_val"),
                                          batch_size=16, max_len=seq),
                      policy_optim=OptimConfig(learning_rate=1.5e-5, final_lr_fraction=1.0),
                      value_optim=OptimConfig(learning_rate=9e-6, final_lr_fraction=1.0),
                      iterations=500, minibatch_size=32, kl_coef=0.02, eval_every=25,
                      checkpoint=CheckpointConfig(save_every=25, keep=2)),
    )
