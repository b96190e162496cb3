"""The one table of stages: the CLI's commands, the pipeline's order and ``pipeline.methods``,
the evaluation's policies, the report's rows and the sweep's read it. Adding a method is a
loss in ``losses.py``, a stage file whose ``run(cfg, workdir, options)`` trains it, and one
line here.

Entries name their runner as ``"module:function"``, imported when the stage runs, so that
``rlhf-jax --help`` and the config never import the models.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the CLI or the pipeline runs a stage (every runner of the table takes these)."""

    stage: str | None = None  # the run directory's subdirectory; None: the stage's name
    show_progress: bool = True
    stop_after: int | None = None  # run at most this many steps now, checkpoint and return None
    # task metrics (such as the gold score) of each held-out evaluation: generations -> {name: value}
    generation_metrics: Callable[[Any], dict[str, float]] | None = None
    reward_fn: Callable | None = None  # a programmatic, jittable reward instead of ``<block>.reward_init``


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``name`` is its run-directory name (and, dashed, its CLI command)."""

    name: str
    runner: str  # "module:function", a function (cfg, workdir, RunOptions) -> export dir | None
    summary: str  # one line, for --help and the report
    block: str | None = None  # the config block it reads (for --reward and errors)
    method: bool = False  # a way to optimise the policy after the RM: pipeline.methods may name it
    online: bool = False  # samples as it trains: its held-out evaluations draw a curve over iterations
    trains: bool = True  # False: an inference-time policy (best-of-n), evaluated from the SFT policy's samples
    command: bool = True  # `rlhf-jax <name>` runs it (ppo_ptx and ppo_gold are PPO with settings)

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    def run(self, cfg: Any, workdir: str | pathlib.Path, options: Any) -> pathlib.Path | None:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(cfg, workdir, options)


STAGES: tuple[Stage, ...] = (
    Stage("pretrain", "rlhf_jax.stages.sft:run_pretrain", "pretrain a base language model on text"),
    Stage("sft", "rlhf_jax.stages.sft:run", "supervised fine-tuning on demonstrations"),
    Stage("comparisons", "rlhf_jax.stages.comparisons:run", "sample K responses per prompt and rank them"),
    Stage("rm", "rlhf_jax.stages.rm:run", "the reward model, on K-wise rankings"),
    Stage("ppo", "rlhf_jax.stages.ppo:run", "PPO against the reward model, KL penalty to SFT", "ppo",
          method=True, online=True),
    Stage("ppo_ptx", "rlhf_jax.stages.ppo:run_ptx", "PPO-ptx: PPO plus pipeline.ptx_coef x pretraining loss",
          "ppo", method=True, online=True, command=False),
    Stage("ppo_gold", "rlhf_jax.stages.ppo:run_gold", "PPO against the gold scorer (a perfect reward model)",
          "ppo", method=True, online=True, command=False),
    Stage("rloo", "rlhf_jax.stages.rloo:run", "RLOO: REINFORCE with a leave-one-out baseline", "rloo",
          method=True, online=True),
    Stage("grpo", "rlhf_jax.stages.grpo:run", "GRPO: group-normalised advantages, clipped, k3 KL", "grpo",
          method=True, online=True),
    Stage("dpo", "rlhf_jax.stages.dpo:run", "DPO / IPO / Plackett-Luce on the comparisons, offline", "dpo",
          method=True),
    Stage("best_of_n", "rlhf_jax.stages.best_of_n:run", "best-of-n: the RM's pick of n SFT samples",
          "best_of_n", method=True, trains=False),
)
BY_NAME = {stage.name: stage for stage in STAGES}
METHODS = tuple(stage.name for stage in STAGES if stage.method)


def stage_named(name: str, where: str) -> Stage:
    """The stage called ``name`` (dashes or underscores); the error names ``where``."""
    from rlhf_jax.config import ConfigError

    stage = BY_NAME.get(name.replace("-", "_"))
    if stage is None:
        raise ConfigError(f"{where}: no stage {name!r}; the stages are {[s.name for s in STAGES]}")
    return stage


def check_methods(methods: tuple[str, ...]) -> tuple[Stage, ...]:
    """``pipeline.methods`` as stages, each a method (after the RM), in the order given."""
    from rlhf_jax.config import ConfigError

    unknown = [m for m in methods if BY_NAME.get(m) is None or not BY_NAME[m].method]
    if unknown:
        raise ConfigError(f"pipeline.methods={list(methods)}: {unknown} not a method; the methods are "
                          f"{list(METHODS)}")
    return tuple(BY_NAME[m] for m in methods)
