"""Which programs ``rlhf-jax compile --stages`` compiles: the stages by name, and
``pipeline``: the stages ``rlhf-jax pipeline`` runs with the config's ``pipeline.methods``."""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from rlhf_jax.aot.method_programs import CRITIC_FREE, best_of_n_programs, critic_free_programs, dpo_programs
from rlhf_jax.aot.programs import Program, comparisons_programs, lm_programs, ppo_programs, rm_programs
from rlhf_jax.config import Config

STAGES = ("pretrain", "sft", "comparisons", "rm", "ppo", "rloo", "grpo", "dpo", "best_of_n")
PIPELINE = "pipeline"  # --stages=pipeline: every stage the configured pipeline runs
DEFAULT_STAGES = ("pretrain", "sft", "rm", "ppo")


def pipeline_stages(cfg: Config) -> tuple[str, ...]:
    """What ``pipeline.run_pipeline`` runs, in its order: pretraining and SFT (of ``rm.model``
    too, when the RM is larger), comparisons, the RM, then ``pipeline.methods`` (ppo_ptx:
    PPO with ``pipeline.ptx_coef``; ppo_gold: PPO, the RM standing in for the gold scorer;
    best_of_n: the draws its evaluation samples)."""
    large = ("pretrain_large", "sft_large") if cfg.rm.model is not None else ()
    return ("pretrain", "sft", *large, "comparisons", "rm", *cfg.pipeline.methods)


def resolve(stages: tuple[str, ...], cfg: Config) -> tuple[str, ...]:
    """``stages`` with ``pipeline`` replaced by :func:`pipeline_stages`, each once."""
    out = []
    for stage in stages:
        out += pipeline_stages(cfg) if stage == PIPELINE else [stage]
    return tuple(dict.fromkeys(out))


def stage_programs(cfg: Config, stages: tuple[str, ...], mesh: Mesh) -> list[Program]:
    """The programs of ``stages`` (of :data:`STAGES` and :func:`pipeline_stages`), in order."""
    programs = []
    for stage in stages:
        if stage in ("pretrain", "sft"):
            programs += lm_programs(cfg, stage, getattr(cfg, stage), mesh)
        elif stage == "pretrain_large":
            programs += lm_programs(cfg, stage, cfg.pretrain, mesh, cfg.rm.model)
        elif stage == "sft_large":
            programs += lm_programs(cfg, stage, cfg.sft, mesh, cfg.rm.model)
        elif stage == "comparisons":
            programs += comparisons_programs(cfg, mesh)
        elif stage == "rm":
            programs += rm_programs(cfg, mesh)
        elif stage in ("ppo", "ppo_gold"):
            programs += ppo_programs(cfg, mesh, stage=stage)
        elif stage == "ppo_ptx":
            programs += ppo_programs(cfg, mesh, dataclasses.replace(cfg.ppo, ptx_coef=cfg.pipeline.ptx_coef), stage)
        elif stage in CRITIC_FREE:
            programs += critic_free_programs(cfg, mesh, stage)
        elif stage == "dpo":
            programs += dpo_programs(cfg, mesh)
        elif stage == "best_of_n":
            programs += best_of_n_programs(cfg, mesh)
        else:
            raise ValueError(f"no programs for stage {stage!r}")
    return programs
