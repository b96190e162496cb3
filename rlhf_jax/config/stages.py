"""Each stage's settings: optimiser, checkpoints and data, then SFT, the reward model,
sampling, PPO, comparisons and the pipeline. Each block's ``validate(where)`` names its
fields by their dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_jax.config.checks import check_dropout, require_at_least
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
        self.data.validate(f"{where}.data")
        self.optim.validate(f"{where}.optim")
        self.checkpoint.validate(f"{where}.checkpoint")
        require_at_least(self, where, 1, "epochs", "log_every")
        require_at_least(self, where, 1, "max_steps", "eval_every", optional=True)
        require_at_least(self, where, 2, "k_max")
        check_dropout(self.dropout, f"{where}.dropout")
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
class PPOConfig:
    """PPO with a per-token KL penalty, and PPO-ptx when ``ptx_coef`` > 0.

    Paper: beta 0.02, 512 episodes per iteration, minibatch 64, 1 inner epoch, EMA 0.992,
    gamma_ptx 27.8 with 8 pretraining sequences per episode.
    """

    prompts: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="task:prompts", val_path="task:prompts_val", batch_size=64, max_len=24))
    pretrain: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="task:pretrain", val_path="task:pretrain_val", batch_size=16, max_len=32))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Temperature of the periodic held-out evaluation. None: the training temperature, so
    # eval/kl_to_ref is a KL estimate like ppo/kl_to_ref (0.0 decodes greedily and reports no
    # KL: the log-ratio of greedy tokens estimates nothing).
    eval_temperature: float | None = None
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-5, final_lr_fraction=1.0))
    value_optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-5, final_lr_fraction=1.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(save_every=10))
    iterations: int = 100  # each: sample prompts.batch_size episodes, score, update
    minibatch_size: int = 16  # episodes per optimiser step
    epochs: int = 1  # passes over each iteration's episodes
    kl_coef: float = 0.02  # beta
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False  # Ziegler et al. controller toward kl_target
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response with no EOS
    # The behaviour policy's log-probs (PPO's ratio denominator): "sampler" takes the ones
    # the sampler computed on its KV-cache pass (of the tempered distribution before any
    # top-k/top-p filtering, as PPO's own forward passes compute them), as TRL does, saving
    # a forward pass; "recompute" runs that forward pass. Greedy sampling always recomputes.
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    ptx_coef: float = 0.0  # gamma_ptx: 0 is plain PPO; the paper's PPO-ptx uses 27.8
    # pretraining rows per optimiser step come from pretrain.batch_size
    ema_decay: float = 0.992  # EMA of policy weights, used for evaluation and export; 0: off
    policy_init: str = "run:sft/export"
    reward_init: str = "run:rm/export"
    value_init: str | None = None  # None: the reward model's export
    eval_every: int = 10  # iterations between held-out evaluations
    log_every: int = 1  # iterations between metrics lines (each costs a device sync, one iteration late)
    # time the rollout, scoring and update phases (time/*_s metrics): waits on the device
    # between phases, so the host can no longer queue the next phase ahead of the device
    time_phases: bool = False

    def validate(self, where: str) -> None:
        for name in ("prompts", "pretrain"):
            getattr(self, name).validate(f"{where}.{name}")
        self.policy_optim.validate(f"{where}.policy_optim")
        self.value_optim.validate(f"{where}.value_optim")
        self.checkpoint.validate(f"{where}.checkpoint")
        require_at_least(self, where, 1, "iterations", "minibatch_size", "epochs", "eval_every", "log_every")


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
    """What ``rlhf-jax pipeline`` runs after SFT and the RM: PPO and PPO-ptx from the same
    SFT model (PPO-ptx uses ``ppo`` with this ptx coefficient), then evaluation."""

    ptx_coef: float = 27.8
    run_ppo_ptx: bool = True
    # Also run PPO against the embedded task's gold scorer itself (stage ppo_gold): a perfect
    # reward model, so the report separates what the RM limits from what PPO limits.
    run_ppo_gold: bool = False
    # Best-of-n diagnosis of the RM on the SFT policy's own samples (held-out prompts, PPO's
    # sampling settings): the gold score of the RM's pick of n against a random sample's and
    # the gold-best one's. PPO can only climb the gold score along what the RM ranks right
    # among the policy's samples. 0 skips it.
    best_of_n: int = 8
    # Held-out evaluation: sampled responses per prompt (at PPO's training temperature, beside
    # one greedy response), and the prompts of instructions only pretraining text asks (the
    # embedded task's held-out family; None skips that evaluation).
    eval_samples: int = 4
    heldout_prompts: str | None = "task:prompts_heldout"
