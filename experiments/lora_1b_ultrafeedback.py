"""A 1B Llama-family model (default shape: Llama-3.2-1B) with LoRA on UltraFeedback: the
reward model learns from **K-wise rankings** (the raw set's 4 completions per instruction,
all C(4,2) pairs in one batch element, as the InstructGPT RM loss wants), on one GPU or a
TPU slice (parameters split over every device, bf16, rematerialised scanned layers).

Where things go (environment variables):
- weights: ``$RLHF_JAX_MODEL_DIR`` (default ``~/models/llama-1b-instruct``), a HF directory with
  its tokenizer and chat template (the prompts are conversations).
- data: ``$RLHF_JAX_DATA_DIR`` (default ``~/data/ultrafeedback``) with
  ``rankings/{train,SPLIT}/comparisons.jsonl`` from the raw set
  (``rlhf-jax data convert --format ultrafeedback --out DIR/rankings ...``) and
  ``sft/{train,SPLIT}/demonstrations.jsonl`` + ``prompts/{train,SPLIT}/prompts.jsonl`` from
  any conversational demonstration set (e.g. ``--format trl`` on UltraChat's
  ``{messages}``); ``SPLIT`` is ``$RLHF_JAX_VAL_SPLIT`` (default ``test``).

LoRA rank 16 on every projection; PPO holds one copy of the policy's weights (its KL
reference is those weights with the adapters off); see docs/lora.md.

    rlhf-jax sft --config experiments/lora_1b_ultrafeedback.py --workdir runs/uf_1b
    rlhf-jax rm --workdir runs/uf_1b && rlhf-jax ppo --workdir runs/uf_1b
"""

import dataclasses
import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, GenerationConfig, LoRAConfig, MeshConfig, ModelConfig, OptimConfig,
                             PPOConfig, RMConfig, SamplingConfig, SFTConfig, TokenizerConfig)

LLAMA_1B = ModelConfig(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       head_dim=64, d_ff=8192, max_len=2048, tie_embeddings=True, rope_theta=500000.0)


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/llama-1b-instruct")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/ultrafeedback")).expanduser()
    val = os.environ.get("RLHF_JAX_VAL_SPLIT", "test")
    if (model_dir / "config.json").exists():
        from rlhf_jax.models.hf_config import model_config_from_hf

        model = model_config_from_hf(model_dir)
    else:
        model = LLAMA_1B
    model = dataclasses.replace(model, hf_path=str(model_dir), param_dtype="bfloat16", compute_dtype="bfloat16",
                                remat=True, scan_layers=True, vocab_pad_multiple=128,
                                lora=LoRAConfig(rank=16, alpha=32.0, dropout=0.05))
    seq = min(1536, model.max_len)
    files = lambda kind, name: (str(data / kind / "train" / f"{name}.jsonl"),  # noqa: E731
                                str(data / kind / val / f"{name}.jsonl"))
    (sft_train, sft_val), (rm_train, rm_val) = files("sft", "demonstrations"), files("rankings", "comparisons")
    prompts_train, prompts_val = files("prompts", "prompts")
    return Config(
        name="lora_1b_ultrafeedback",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=sft_train, val_path=sft_val, batch_size=32, max_len=seq),
                      optim=OptimConfig(learning_rate=2e-4, warmup_steps=50), epochs=1, eval_every=500, log_every=20,
                      checkpoint=CheckpointConfig(save_every=500, keep=2)),
        # 4 completions per instruction: one forward pass per response, all 6 pairs in one element
        rm=RMConfig(data=DataConfig(train_path=rm_train, val_path=rm_val, batch_size=16, max_len=seq),
                    optim=OptimConfig(learning_rate=1e-4), k_max=4, epochs=1, log_every=20,
                    normalize_path=sft_val, checkpoint=CheckpointConfig(save_every=500, keep=2)),
        ppo=PPOConfig(prompts=DataConfig(train_path=prompts_train, val_path=prompts_val, batch_size=64,
                                         max_len=seq // 2),
                      pretrain=DataConfig(train_path="task:pretrain", val_path=None),  # no PPO-ptx here
                      policy_optim=OptimConfig(learning_rate=5e-5, final_lr_fraction=1.0),
                      value_optim=OptimConfig(learning_rate=5e-5, final_lr_fraction=1.0),
                      iterations=400, minibatch_size=16, kl_coef=0.05, eval_every=25,
                      checkpoint=CheckpointConfig(save_every=25, keep=2)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=384, temperature=1.0)),
    )
