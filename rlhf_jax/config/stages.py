"""Each stage's settings: optimiser, checkpoints and data, then SFT, the reward model,
sampling and generation, comparisons and the pipeline (the methods after the RM are in
:mod:`rlhf_jax.config.methods`). Each block's ``validate(where)`` names its
fields by their dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_jax.config.checks import ConfigError, check_dropout, require_at_least
from rlhf_jax.config.model import ModelConfig


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with the paper's betas and a cosine decay to ``final_lr_fraction`` of peak."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    grad_accum_steps: int = 1  # micro-batches per optimiser update

    def validate(self, where: str) -> None:
        require_at_least(self, where, 1, "grad_accum_steps")
        require_at_least(self, where, 0, "learning_rate", "warmup_steps", "grad_clip", "final_lr_fraction")


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 100  # optimiser steps between checkpoints
    keep: int = 2  # checkpoints kept on disk

    def validate(self, where: str) -> None:
        require_at_least(self, where, 1, "save_every", "keep")


@dataclass(frozen=True)
class DataConfig:
    """Where a stage's examples come from and how they are batched.

    Paths are JSONL files, or ``task:<name>`` for a set the embedded task writes into the
    run directory (for example ``task:demonstrations``).
    """

    train_path: str = "task:demonstrations"
    val_path: str | None = "task:demonstrations_val"
    batch_size: int = 16  # global batch, across all processes
    max_len: int = 64  # every batch is [batch_size, max_len]: nothing recompiles
    packing: bool = False  # pack several examples per row (segment ids keep them apart)
    shuffle: bool = True
    on_too_long: Literal["truncate", "error"] = "truncate"

    def validate(self, where: str) -> None:
        require_at_least(self, where, 1, "batch_size")
        require_at_least(self, where, 2, "max_len")  # a next-token target needs a token before it


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on demonstrations (paper: 16 epochs, dropout 0.2)."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    epochs: int = 2
    max_steps: int | None = None  # cap on optimiser steps; None: run all epochs
    dropout: float = 0.0
    eval_every: int = 50  # optimiser steps between validation passes
    log_every: int = 10
    init_from: str | None = None  # an export directory to start from; None: fresh init

    def validate(self, where: str) -> None:
        self.data.validate(f"{where}.data")
        self.optim.validate(f"{where}.optim")
        self.checkpoint.validate(f"{where}.checkpoint")
        require_at_least(self, where, 1, "epochs", "eval_every", "log_every")
        require_at_least(self, where, 1, "max_steps", optional=True)
        check_dropout(self.dropout, f"{where}.dropout")


def validate_ranking_training(block, where: str) -> None:
    """The checks every stage that trains on ranked comparisons shares (the RM, DPO): its
    data, optimiser and checkpoint blocks, step counts, ``k_max`` >= 2 and dropout."""
    block.data.validate(f"{where}.data")
    block.optim.validate(f"{where}.optim")
    block.checkpoint.validate(f"{where}.checkpoint")
    require_at_least(block, where, 1, "epochs", "log_every")
    require_at_least(block, where, 1, "max_steps", "eval_every", optional=True)
    require_at_least(block, where, 2, "k_max")
    check_dropout(block.dropout, f"{where}.dropout")


@dataclass(frozen=True)
class RMConfig:
    """Reward model on ranked comparisons (paper: 1 epoch; the RM starts from the SFT model)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="run:comparisons/train.jsonl", val_path="run:comparisons/val.jsonl"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    k_max: int = 9  # responses per prompt are padded to this (InstructGPT: K = 4..9)
    epochs: int = 1
    max_steps: int | None = None
    dropout: float = 0.0
    eval_every: int | None = None  # optimiser steps between validation passes; None: each epoch
    log_every: int = 10
    init_from: str | None = "run:sft/export"  # an LM export whose backbone starts the RM; None: fresh
    normalize_path: str | None = "task:demonstrations"  # demonstrations that should score mean 0
    normalize_gain: bool = False  # also scale so the demonstrations' rewards have std 1
    # The RM's own architecture (None: ``model``). InstructGPT's 6B RM served its 1.3B policy:
    # a larger RM can judge errors the policy cannot see. The pipeline then pretrains and
    # fine-tunes this model too (stages pretrain_large, sft_large); point ``init_from`` at
    # ``run:sft_large/export``. PPO reads the RM's architecture from its export.
    model: ModelConfig | None = None

    def validate(self, where: str) -> None:
        validate_ranking_training(self, where)
        if self.model is not None:
            self.model.validate(f"{where}.model")


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled. temperature 0 is greedy; top_k 0 and top_p 1.0 disable
    those filters."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class GenerationConfig:
    """How a policy generates outside the comparisons stage: every online method's episodes
    (PPO, RLOO, GRPO), their periodic evaluation, the pipeline's evaluation, best-of-n,
    ``rlhf-jax sample`` and the labeling page."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Temperature of the online methods' periodic held-out evaluation. None: the sampling
    # temperature, so eval/kl_to_ref is a KL estimate like the training one (0.0 decodes
    # greedily and reports no KL: the log-ratio of greedy tokens estimates nothing).
    eval_temperature: float | None = None
    # The per-token estimate of KL(policy || reference) every evaluation sums over a sampled
    # response (eval/kl_to_ref, the report's kl_to_sft): one for every method, so they compare.
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    # The prompts a policy answers outside training: val_path for the pipeline's evaluation,
    # best-of-n and ``rlhf-jax sample``; max_len and batch_size shape every such batch.
    prompts: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="task:prompts", val_path="task:prompts_val", batch_size=64, max_len=24))

    def validate(self, where: str) -> None:
        self.prompts.validate(f"{where}.prompts")
        require_at_least(self.sampling, f"{where}.sampling", 1, "max_new_tokens")
        require_at_least(self.sampling, f"{where}.sampling", 0, "temperature", "top_k")


@dataclass(frozen=True)
class ComparisonsConfig:
    """Collecting comparisons between stages: K responses per prompt sampled from one or more
    policies (response r from policy r mod len(policies)), ranked by a labeler
    (InstructGPT: K = 4..9, ties allowed, outputs of several models compared)."""

    policies: tuple[str, ...] = ("run:sft/export",)
    prompts: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="task:prompts", val_path=None, batch_size=16, max_len=24))
    n_prompts: int = 1000  # prompts that get K responses each (capped by the prompt file)
    k_min: int = 4
    k_max: int = 9
    val_fraction: float = 0.1  # share of prompts held out for the RM's validation accuracy
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    labeler: str = "task"  # "task": the embedded task's noisy labeler; else a comparisons JSONL to use as is
    labeler_temperature: float | None = None  # None: the task's default (~73% inter-labeler agreement)

    def validate(self, where: str) -> None:
        self.prompts.validate(f"{where}.prompts")
        require_at_least(self, where, 1, "n_prompts")


@dataclass(frozen=True)
class PipelineConfig:
    """What ``rlhf-jax pipeline`` runs after SFT and the RM (``methods``, names from the stage
    table ``rlhf_jax.stages.table``), then the evaluation of every policy."""

    # ppo_ptx is ppo with ptx_coef set to pipeline.ptx_coef; ppo_gold is ppo against the
    # embedded task's gold scorer (a perfect reward model: the report then separates what the
    # RM limits from what PPO limits); best_of_n evaluates the RM's pick of best_of_n.n SFT samples.
    methods: tuple[str, ...] = ("ppo", "ppo_ptx")
    ptx_coef: float = 27.8
    # Best-of-n diagnosis of the RM on the SFT policy's own samples (held-out prompts, the
    # generation settings): the gold score of the RM's pick of n against a random sample's and
    # the gold-best one's. PPO can only climb the gold score along what the RM ranks right
    # among the policy's samples. 0 skips it.
    best_of_n: int = 8
    # The frontier every method is plotted against: best-of-n of SFT samples at these n
    # (gold score against KL to SFT, log n - (n - 1) / n). Empty: not drawn.
    frontier: tuple[int, ...] = (1, 2, 4, 8, 16)
    # Held-out evaluation: sampled responses per prompt (at the sampling temperature, beside
    # one greedy response), and the prompts of instructions only pretraining text asks (the
    # embedded task's held-out family; None skips that evaluation).
    eval_samples: int = 4
    heldout_prompts: str | None = "task:prompts_heldout"
    # The texts whose loss measures each policy's alignment tax (val_path).
    eval_texts: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="task:pretrain", val_path="task:pretrain_val", batch_size=16, max_len=32))

    def validate(self, where: str) -> None:
        self.eval_texts.validate(f"{where}.eval_texts")
        require_at_least(self, where, 0, "best_of_n")
        require_at_least(self, where, 1, "eval_samples")
        if any(n < 1 for n in self.frontier):
            raise ConfigError(f"{where}.frontier must hold n >= 1, got {self.frontier}")
        if len(set(self.methods)) < len(self.methods):
            raise ConfigError(f"{where}.methods names a method twice: {self.methods}")
