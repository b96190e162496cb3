"""InstructGPT's headline in miniature: a small model after PPO against a larger model after
SFT alone (the paper: outputs of the 1.3B PPO-ptx model were preferred to those of the 175B
GPT-3, and its 6B reward model served every policy size).

The embedded default's policy (2 layers, d_model 128), plus a larger model (4 layers,
d_model 192: about 4x the compute) that the pipeline pretrains and fine-tunes on the same
corpus and demonstrations (stages ``pretrain_large``, ``sft_large``). The reward model (and
so PPO's value model) starts from that larger SFT model; the policy stays small. The
report's ``ppo_ptx.sampled.win_rate_vs_sft_large`` is the fraction of held-out prompts (and
samples) where the gold scorer prefers the small PPO-ptx policy's response to the large SFT
model's (ties half); ``greedy`` holds the same for greedy responses.

    rlhf-jax pipeline --config experiments/small_ppo_vs_large_sft.py --workdir runs/small_vs_large
    python -m rlhf_jax.sweep --config experiments/small_ppo_vs_large_sft.py --workdir runs/sweep_large
"""

import dataclasses

from rlhf_jax.config import Config
from rlhf_jax.default_config import default_config


def get_config() -> Config:
    cfg = default_config()
    large = dataclasses.replace(cfg.model, d_model=192, n_layers=4, n_heads=6, n_kv_heads=3, d_ff=576)
    return dataclasses.replace(
        cfg, name="small_ppo_vs_large_sft",
        rm=dataclasses.replace(cfg.rm, model=large, init_from="run:sft_large/export"))
