"""The policy-optimisation methods that run after the reward model: the online ones (PPO,
RLOO, GRPO: sample, score, update, repeat) share :class:`OnlineConfig`; DPO learns offline
from the comparisons; best-of-n changes no weight. Each block's ``validate(where)`` names
its fields by their dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_jax.config.checks import ConfigError, require_at_least
from rlhf_jax.config.stages import CheckpointConfig, DataConfig, OptimConfig, validate_ranking_training

GOLD_REWARD = "gold"  # reward_init: the embedded task's gold scorer instead of a reward model


def _prompts() -> DataConfig:
    return DataConfig(train_path="task:prompts", val_path="task:prompts_val", batch_size=64, max_len=24)


def _pretrain() -> DataConfig:
    return DataConfig(train_path="task:pretrain", val_path="task:pretrain_val", batch_size=16, max_len=32)


def _policy_optim() -> OptimConfig:
    return OptimConfig(learning_rate=1e-5, final_lr_fraction=1.0)


@dataclass(frozen=True)
class OnlineConfig:
    """What every online method shares: each iteration samples episodes from the policy
    (``generation.sampling``), scores them, and takes ``epochs`` passes of minibatch steps."""

    # train_path: the prompts of the episodes; val_path: the periodic held-out evaluation's
    prompts: DataConfig = field(default_factory=_prompts)
    # val_path: the periodic evaluation's pretraining loss (the alignment tax); PPO-ptx trains on train_path
    pretrain: DataConfig = field(default_factory=_pretrain)
    policy_optim: OptimConfig = field(default_factory=_policy_optim)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(save_every=10))
    iterations: int = 100  # each: sample, score, update
    minibatch_size: int = 16  # episodes per optimiser step
    epochs: int = 1  # passes over each iteration's episodes
    kl_coef: float = 0.02  # beta: weight of the KL to the reference policy
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response with no EOS
    # The behaviour policy's log-probs: "sampler" takes the ones the sampler computed on its
    # KV-cache pass (of the tempered distribution before any top-k/top-p filtering, as the
    # update's own forward passes compute them), as TRL does, saving a forward pass;
    # "recompute" runs that forward pass. Greedy sampling always recomputes.
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    ema_decay: float = 0.992  # EMA of policy weights, used for evaluation and export; 0: off
    policy_init: str = "run:sft/export"  # also the KL reference
    reward_init: str = "run:rm/export"  # a reward-model export, or "gold": the embedded task's gold scorer
    eval_every: int = 10  # iterations between held-out evaluations
    log_every: int = 1  # iterations between metrics lines (each costs a device sync, one iteration late)
    # time the rollout, scoring and update phases (time/*_s metrics): waits on the device
    # between phases, so the host can no longer queue the next phase ahead of the device
    time_phases: bool = False

    group_size = 1  # responses sampled per prompt (RLOO and GRPO compare a prompt's group)

    def validate(self, where: str) -> None:
        for name in ("prompts", "pretrain"):
            getattr(self, name).validate(f"{where}.{name}")
        self.policy_optim.validate(f"{where}.policy_optim")
        self.checkpoint.validate(f"{where}.checkpoint")
        require_at_least(self, where, 1, "iterations", "minibatch_size", "epochs", "eval_every", "log_every")
        require_at_least(self, where, 0, "kl_coef", "ema_decay")

    @property
    def episodes(self) -> int:
        """Episodes per iteration: every prompt of a batch ``group_size`` times."""
        return self.prompts.batch_size * self.group_size

    def updates_per_iteration(self, where: str) -> int:
        """Optimiser steps per iteration; refuses episodes that minibatches do not divide."""
        if self.episodes % self.minibatch_size:
            raise ConfigError(f"{where}: {self.episodes} episodes per iteration (prompts.batch_size="
                              f"{self.prompts.batch_size} x group_size={self.group_size}) is not a multiple of "
                              f"minibatch_size={self.minibatch_size}")
        return self.epochs * self.episodes // self.minibatch_size


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    """PPO with a per-token KL penalty, and PPO-ptx when ``ptx_coef`` > 0.

    Paper: beta 0.02, 512 episodes per iteration, minibatch 64, 1 inner epoch, EMA 0.992,
    gamma_ptx 27.8 with 8 pretraining sequences per episode.
    """

    value_optim: OptimConfig = field(default_factory=_policy_optim)
    adaptive_kl: bool = False  # Ziegler et al. controller toward kl_target
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    ptx_coef: float = 0.0  # gamma_ptx: 0 is plain PPO; the paper's PPO-ptx uses 27.8
    # pretraining rows per optimiser step come from pretrain.batch_size
    value_init: str | None = None  # None: the reward model's export (the policy's, for a gold reward)

    def validate(self, where: str) -> None:
        super().validate(where)
        self.value_optim.validate(f"{where}.value_optim")


@dataclass(frozen=True)
class RLOOConfig(OnlineConfig):
    """RLOO (Ahmadian et al. 2024): ``group_size`` responses per prompt, REINFORCE on each
    response's summed log-prob with the mean of the others' rewards as its baseline; the KL
    to the reference is a penalty on the reward (TRL's form). No value model."""

    group_size: int = 4
    kl_coef: float = 0.05
    clip: float | None = 0.2  # bound on the sequence ratio (matters only from a second pass, epochs > 1)
    normalize_advantages: bool = False  # whiten the batch's advantages

    def validate(self, where: str) -> None:
        super().validate(where)
        require_at_least(self, where, 2, "group_size")
        require_at_least(self, where, 0, "clip", optional=True)


@dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
    """GRPO (Shao et al. 2024): ``group_size`` responses per prompt, each with its group-
    normalised reward as the advantage of every token, the clipped surrogate, and the k3 KL
    to the reference in the loss. ``advantage="dr_grpo"`` with ``aggregation="constant"`` is
    Dr. GRPO; ``clip_high`` > ``clip_low`` is DAPO's clip-higher."""

    group_size: int = 4
    kl_coef: float = 0.04
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    advantage_eps: float = 1e-4
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: Literal["seq_mean_token_mean", "token_mean", "constant"] = "seq_mean_token_mean"

    def validate(self, where: str) -> None:
        super().validate(where)
        require_at_least(self, where, 2, "group_size")
        require_at_least(self, where, 0, "clip_low", "clip_high", "advantage_eps")


@dataclass(frozen=True)
class DPOConfig:
    """DPO on the collected comparisons: the policy starts from the SFT model, which is also
    the frozen reference. K-wise rankings are used whole (every ordered pair, or the
    Plackett-Luce likelihood); chosen/rejected rows are K = 2."""

    data: DataConfig = field(default_factory=lambda: DataConfig(
        train_path="run:comparisons/train.jsonl", val_path="run:comparisons/val.jsonl"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-5))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    k_max: int = 9  # responses per prompt are padded to this
    kind: Literal["sigmoid", "ipo", "plackett_luce"] = "sigmoid"  # DPO, IPO or listwise DPO
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO: the share of labels taken to be wrong (sigmoid only)
    epochs: int = 1
    max_steps: int | None = None
    dropout: float = 0.0
    eval_every: int | None = None  # optimiser steps between validation passes; None: each epoch
    log_every: int = 10
    policy_init: str = "run:sft/export"  # where the policy starts
    reference_init: str | None = None  # the frozen reference; None: policy_init

    def validate(self, where: str) -> None:
        validate_ranking_training(self, where)
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.kind != "sigmoid":
            raise ConfigError(f"{where}.label_smoothing={self.label_smoothing} applies to kind='sigmoid' only, "
                              f"not {self.kind!r}")


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-n, an inference-time policy: sample ``n`` responses from ``policy_init`` and
    keep the one the reward model scores highest. ``rlhf-jax best-of-n`` answers the held-out
    prompts (``generation.prompts.val_path``) and writes every response with its score."""

    n: int = 16
    policy_init: str = "run:sft/export"
    reward_init: str = "run:rm/export"  # or "gold": the embedded task's gold scorer

    def validate(self, where: str) -> None:
        require_at_least(self, where, 1, "n")
