"""Typed, frozen run configuration.

An experiment is a Python file in ``experiments/`` whose ``get_config()`` returns a
:class:`Config`. The command line overrides any field by its dotted name
(``--sft.optim.learning_rate=3e-4``) through ``tyro``; the resolved config is written to
``<workdir>/config.json`` and read back with :func:`config_from_dict`, which rejects
unknown and ill-typed fields.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import dacite


class ConfigError(ValueError):
    """A config that cannot describe a valid run; the message names the field."""


def _require_at_least(block: Any, where: str, minimum: int | float, *names: str, optional: bool = False) -> None:
    """Each named field of ``block`` must be >= ``minimum`` (None allowed when ``optional``);
    the error names the field by its dotted path (``where`` is the block's)."""
    for name in names:
        value = getattr(block, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            allowed = " (or None)" if optional else ""
            raise ConfigError(f"{where}.{name} must be >= {minimum}{allowed}, got {value}")


# ModelConfig.remat -> jax.checkpoint_policies name (None: no remat)
REMAT_POLICIES = {False: None, "none": None, True: "nothing_saveable", "full": "nothing_saveable",
                  "dots_saveable": "dots_saveable",
                  "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable"}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. ``family`` picks the block layout:

    - ``gpt2``: learned positions, LayerNorm, GELU MLP, biases everywhere, tied embeddings.
    - ``llama``: RoPE, RMSNorm, SwiGLU MLP, no biases (``qkv_bias`` for Qwen2), grouped-query
      attention through ``n_kv_heads``, usually an untied head.
    """

    family: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 256
    max_len: int = 256  # learned position table size (gpt2); cache bound for decoding
    tie_embeddings: bool = True
    qkv_bias: bool = False  # llama family only (Qwen2 sets it); gpt2 always has biases
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # residual and embedding dropout while training
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # recompute each block in the backward pass to save memory: False/"none" (off),
    # True/"full" (save nothing), "dots_saveable" (keep matmul outputs), as jax.checkpoint policies
    remat: bool | Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = False
    # run the blocks under flax.linen.scan, params stacked on a leading "layers" axis
    # (backbone/layers/...): compile time flat in depth. Opt-in; see docs/scan_layers.md
    scan_layers: bool = False
    # default: "chunked" on CPU (causal query chunks, upper blocks skipped), JAX's pick elsewhere
    attention_impl: Literal["xla", "cudnn", "chunked", "default"] = "default"
    hf_path: str | None = None  # a local HF checkpoint directory to start from

    @property
    def remat_policy(self) -> str | None:
        """The ``jax.checkpoint_policies`` name ``remat`` picks, None when off."""
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be one of {sorted(REMAT_POLICIES, key=str)}, "
                              f"got {self.remat!r}")
        return REMAT_POLICIES[self.remat]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def validate(self, where: str = "model") -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"{where}.d_model={self.d_model} is not divisible by {where}.n_heads={self.n_heads}; "
                f"set {where}.head_dim explicitly")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{where}.n_heads={self.n_heads} is not a multiple of {where}.n_kv_heads={self.kv_heads}")
        if self.family == "gpt2" and self.kv_heads != self.n_heads:
            raise ConfigError(f"{where}.n_kv_heads: the gpt2 family has no grouped-query attention")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"{where}.remat must be one of {sorted(REMAT_POLICIES, key=str)}, "
                              f"got {self.remat!r}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh over ``('data', 'fsdp', 'tensor')``; one axis may be -1 (fill)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host JAX. ``auto``: call ``jax.distributed.initialize()`` when the environment
    says this is one process of several (TPU VM pod, or JAX/SLURM coordinator variables);
    ``on``: always, with the fields below when given; ``off``: never."""

    mode: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: str | None = None  # comma-separated, e.g. "0,1,2,3"


@dataclass(frozen=True)
class TokenizerConfig:
    """``task``: the embedded task's tokenizer; ``hf``: ``AutoTokenizer`` from local ``path``."""

    kind: Literal["task", "hf"] = "task"
    path: str | None = None


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
        _require_at_least(self, where, 1, "grad_accum_steps")
        _require_at_least(self, where, 0, "learning_rate", "warmup_steps", "grad_clip", "final_lr_fraction")


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 100  # optimiser steps between checkpoints
    keep: int = 2  # checkpoints kept on disk

    def validate(self, where: str) -> None:
        _require_at_least(self, where, 1, "save_every", "keep")


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
        _require_at_least(self, where, 1, "batch_size")
        _require_at_least(self, where, 2, "max_len")  # a next-token target needs a token before it


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
        _require_at_least(self, where, 1, "epochs", "eval_every", "log_every")
        _require_at_least(self, where, 1, "max_steps", optional=True)
        _check_dropout(self.dropout, f"{where}.dropout")


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
        _require_at_least(self, where, 1, "epochs", "log_every")
        _require_at_least(self, where, 1, "max_steps", "eval_every", optional=True)
        _require_at_least(self, where, 2, "k_max")
        _check_dropout(self.dropout, f"{where}.dropout")
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

    stage_name: str = "ppo"  # the run sub-directory; the pipeline uses ppo and ppo_ptx
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

    def validate(self, where: str) -> None:
        for name in ("prompts", "pretrain"):
            getattr(self, name).validate(f"{where}.{name}")
        self.policy_optim.validate(f"{where}.policy_optim")
        self.value_optim.validate(f"{where}.value_optim")
        self.checkpoint.validate(f"{where}.checkpoint")
        _require_at_least(self, where, 1, "iterations", "minibatch_size", "epochs", "eval_every")


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
        _require_at_least(self, where, 1, "n_prompts")


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


@dataclass(frozen=True)
class Config:
    """A whole run: the model, the mesh and each stage's settings."""

    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: SFTConfig = field(default_factory=lambda: SFTConfig(
        data=DataConfig(train_path="task:pretrain", val_path="task:pretrain_val", batch_size=64, max_len=32)))
    sft: SFTConfig = field(default_factory=SFTConfig)
    comparisons: ComparisonsConfig = field(default_factory=ComparisonsConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # A persistent XLA compilation cache, so a rerun or a resumed stage loads its programs
    # instead of compiling them again: a directory, or run:<path> inside the run directory
    # (e.g. run:xla_cache). None: JAX's own setting (off unless JAX_COMPILATION_CACHE_DIR
    # is set, which then wins). One per process: the first stage's directory is kept.
    compilation_cache_dir: str | None = None

    def validate(self) -> "Config":
        """Checks every block, so a bad field is refused before a stage writes anything."""
        self.model.validate()
        for name in ("pretrain", "sft", "comparisons", "rm", "ppo"):
            getattr(self, name).validate(name)
        reads_collected = any((path or "").startswith("run:comparisons/")
                              for path in (self.rm.data.train_path, self.rm.data.val_path))
        if reads_collected and self.comparisons.k_max > self.rm.k_max:  # else refused only after collecting
            raise ConfigError(f"comparisons.k_max={self.comparisons.k_max} is larger than rm.k_max={self.rm.k_max}: "
                              "the RM pads each prompt's responses to rm.k_max and refuses a comparison with more; "
                              "raise rm.k_max or lower comparisons.k_max")
        return self


def _check_dropout(value: float, field: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Builds a :class:`Config` from a dict, rejecting unknown and ill-typed fields."""
    try:
        cfg = dacite.from_dict(Config, data, config=dacite.Config(strict=True, cast=[tuple]))
    except dacite.DaciteError as err:
        raise ConfigError(f"{source}: invalid config: {err}") from err
    return cfg.validate()


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    tmp.replace(path)


def load_config(path: str | pathlib.Path) -> Config:
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    return config_from_dict(data, source=str(path))


def load_experiment(path: str | pathlib.Path) -> Config:
    """Imports an experiment file and returns its ``get_config()``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no experiment file at {path}")
    spec = importlib.util.spec_from_file_location(f"rlhf_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: an experiment file must define get_config() -> Config")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not Config")
    return cfg


def apply_overrides(cfg: Config, args: Sequence[str]) -> Config:
    """Applies ``--dotted.field=value`` overrides; unknown or ill-typed fields exit with an error."""
    import tyro

    if not args:
        return cfg.validate()
    # HelptextFromCommentsOff: tyro would otherwise ast-parse this module for field comments
    # while reporting an error, which CPython 3.11.7 can fail with "AST constructor recursion
    # depth mismatch" (a SystemError instead of the error message) when called deep in a stack.
    try:
        new = tyro.cli(Config, default=cfg, args=list(args),
                       config=(tyro.conf.FlagConversionOff, tyro.conf.HelptextFromCommentsOff), prog="rlhf-jax")
    except SystemError as err:  # the CPython bug above: report the value error tyro was rendering
        print(f"rlhf-jax: error: invalid override in {list(args)}: {err.__context__ or err}", file=sys.stderr)
        raise SystemExit(2) from err
    return new.validate()
