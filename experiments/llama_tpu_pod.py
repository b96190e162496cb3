"""A Llama-family model (default shape: Llama-3.2-1B) through SFT, RM and PPO on a TPU pod
slice (sized for v5p-32: 16 chips over 4 hosts), launched with ``tpu_scripts/``.

Where things go (override with environment variables; every host must see them, e.g. on
a shared bucket mounted at the same path, or copied by the setup script):
- weights: a local HF Llama/Mistral/Qwen2 directory (``config.json``, safetensors shards with
  their index, tokenizer files) at ``$RLHF_JAX_MODEL_DIR`` (default ``~/models/llama``).
- data: ``$RLHF_JAX_DATA_DIR`` (default ``~/data/instruct``) with ``sft_{train,val}.jsonl``,
  ``comparisons_{train,val}.jsonl`` ({"prompt", "responses", "ranks"}, K = 4..9),
  ``prompts_{train,val}.jsonl`` and ``pretrain_{train,val}.jsonl``.

Parameters are split over fsdp (ZeRO-3 style) and tensor; the batch over data x fsdp.
``jax.distributed`` starts by itself on a TPU VM pod (distributed.mode = auto).
"""

import dataclasses
import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, GenerationConfig, MeshConfig, ModelConfig,
                             OptimConfig, PPOConfig, RMConfig, SFTConfig, SamplingConfig, TokenizerConfig)

LLAMA_1B = ModelConfig(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       head_dim=64, d_ff=8192, max_len=2048, tie_embeddings=True, rope_theta=500000.0)


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/llama")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/instruct")).expanduser()
    if (model_dir / "config.json").exists():
        from rlhf_jax.models.hf_config import model_config_from_hf

        model = model_config_from_hf(model_dir)
    else:
        model = LLAMA_1B
    model = dataclasses.replace(model, hf_path=str(model_dir), compute_dtype="bfloat16", remat=True)
    seq, prompt = min(1024, model.max_len), min(512, model.max_len // 2)
    jsonl = lambda name: str(data / f"{name}.jsonl")  # noqa: E731
    return Config(
        name="llama_tpu_pod",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=jsonl("sft_train"), val_path=jsonl("sft_val"), batch_size=128,
                                      max_len=seq, packing=True),
                      optim=OptimConfig(learning_rate=1e-5, warmup_steps=100), epochs=16, dropout=0.2,
                      checkpoint=CheckpointConfig(save_every=500, keep=3), eval_every=500, log_every=20),
        rm=RMConfig(data=DataConfig(train_path=jsonl("comparisons_train"), val_path=jsonl("comparisons_val"),
                                    batch_size=64, max_len=seq),
                    optim=OptimConfig(learning_rate=9e-6), k_max=9, epochs=1, normalize_path=jsonl("sft_val"),
                    checkpoint=CheckpointConfig(save_every=500, keep=3)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=256, temperature=1.0),
                                    prompts=DataConfig(train_path=jsonl("prompts_train"),
                                                       val_path=jsonl("prompts_val"), batch_size=512,
                                                       max_len=prompt)),
        ppo=PPOConfig(prompts=DataConfig(train_path=jsonl("prompts_train"), val_path=jsonl("prompts_val"),
                                         batch_size=512, max_len=prompt),
                      pretrain=DataConfig(train_path=jsonl("pretrain_train"), val_path=jsonl("pretrain_val"),
                                          batch_size=64, max_len=seq),
                      policy_optim=OptimConfig(learning_rate=9.65e-6, final_lr_fraction=1.0),
                      value_optim=OptimConfig(learning_rate=5e-6, final_lr_fraction=1.0),
                      iterations=256, minibatch_size=64, epochs=1, kl_coef=0.02, ptx_coef=27.8,
                      eval_every=16, checkpoint=CheckpointConfig(save_every=8, keep=3)),
    )
