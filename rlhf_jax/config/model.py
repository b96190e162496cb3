"""What a run runs on: the model's architecture, the device mesh, multi-host JAX and the
tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_jax.config.checks import ConfigError


# scan_layers="auto" scans models this deep or deeper. Compile seconds of the SFT step on the
# 2-core CPU (benchmarks/compile_time.py): see docs/scan_layers.md
SCAN_LAYERS_FROM = 8

# cuDNN flash attention takes half precision only (it refuses float32 inputs), and a head
# dim that is a multiple of 8 and at most 256 (JAX allows 256 from Hopper on, 128 before).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 256


def cudnn_refusal(compute_dtype: str, head_dim: int, where: str = "model") -> str | None:
    """Why cuDNN flash attention cannot run a model of ``compute_dtype`` and ``head_dim``
    on any GPU (None: it can). Shared by ``models.attention.choose_attention`` and
    ``ModelConfig.validate`` (it lives here so that the config never imports the models)."""
    if compute_dtype not in CUDNN_DTYPES:
        return (f"cuDNN flash attention needs {where}.compute_dtype in {list(CUDNN_DTYPES)}, "
                f"got {compute_dtype!r}")
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most "
                f"{CUDNN_MAX_HEAD_DIM}, got {head_dim} ({where}.head_dim, or d_model / n_heads)")
    return None


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
    # The embedding (and an untied lm_head) get padded_vocab_size rows: vocab_size rounded up
    # to this multiple, so that the mesh's tensor axis, which splits the vocabulary, divides
    # it (GPT-2's 50257 is divisible by no axis size). The padded ids' logits are masked out
    # (models.vocab.MASKED_LOGIT), so nothing samples or scores them, and exports keep
    # vocab_size rows. 1: no padding. Set it to a multiple of mesh.tensor (128 suits any
    # power-of-two tensor axis up to 128, and GPU matmuls); it is a layout, not architecture.
    vocab_pad_multiple: int = 1
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
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # recompute each block in the backward pass to save memory: False/"none" (off),
    # True/"full" (save nothing), "dots_saveable" (keep matmul outputs), as jax.checkpoint policies
    remat: bool | Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = False
    # run the blocks under flax.linen.scan, params stacked on a leading "layers" axis
    # (backbone/layers/...): compile time flat in depth. "auto": from SCAN_LAYERS_FROM layers
    # on (unrolled compiles faster below that); see docs/scan_layers.md
    scan_layers: bool | Literal["auto"] = "auto"
    # The attention core of a forward pass without a KV cache (models.attention.choose_attention,
    # docs/attention.md). "default": "chunked" on CPU (causal query chunks, upper blocks
    # skipped); on a GPU cuDNN flash attention for batches the caller declares right-padded
    # (right_padded=True: one segment a row, then padding) in bfloat16, else XLA's masked path;
    # on TPU Pallas splash attention for lengths a multiple of 128, else XLA's path. "splash": that
    # on TPU, refused elsewhere. "cudnn": as default on a GPU, refused on CPU/TPU and with float32
    # compute; packed or left-padded batches still take the mask. "xla"/"chunked": always that.
    # Decoding with a KV cache always uses the mask.
    attention_impl: Literal["xla", "cudnn", "chunked", "splash", "default"] = "default"
    hf_path: str | None = None  # a local HF checkpoint directory to start from
    # The most f32 logits one device holds at a time in a loss over the vocabulary (SFT and
    # pretraining cross-entropy, PPO's log-probs and entropy, evaluation): longer passes are
    # unembedded a chunk of positions at a time (rlhf_jax.lm_terms). 256 MiB: a Llama-1B pass
    # of 4 x 2048 tokens per chip (1 GiB of logits) takes 4 chunks; every CPU run, one.
    logits_chunk_bytes: int = 256 * 2 ** 20

    @property
    def remat_policy(self) -> str | None:
        """The ``jax.checkpoint_policies`` name ``remat`` picks, None when off."""
        self._check_remat("model")
        return REMAT_POLICIES[self.remat]

    def _check_remat(self, where: str) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"{where}.remat must be one of {sorted(REMAT_POLICIES, key=str)}, "
                              f"got {self.remat!r}")

    @property
    def stacked(self) -> bool:
        """Whether the blocks run under ``nn.scan`` with stacked params (``scan_layers`` resolved)."""
        return self.n_layers >= SCAN_LAYERS_FROM if self.scan_layers == "auto" else bool(self.scan_layers)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding: ``vocab_size`` rounded up to ``vocab_pad_multiple``."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def validate(self, where: str = "model") -> None:
        positive = ("vocab_size", "vocab_pad_multiple", "d_model", "n_layers", "n_heads", "d_ff", "max_len",
                    "logits_chunk_bytes")
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
        if self.attention_impl == "cudnn":  # refused here on any machine, not at the first step
            why = cudnn_refusal(self.compute_dtype, self.dim_per_head, where)
            if why:
                raise ConfigError(f"{where}.attention_impl='cudnn': {why}")
        self._check_remat(where)


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
    """``task``: the embedded task's tokenizer; ``hf``: ``AutoTokenizer`` from local ``path``.

    ``chat_template``: ``auto`` renders conversation prompts (message lists) with the
    tokenizer's own chat template when it has one, and every response then ends with the
    template's end-of-turn token, where sampling stops; ``none`` never uses a template (a
    conversation prompt is refused). One setting for the run, so SFT, the RM, PPO, sampling
    and evaluation agree on the stop token. Text prompts are encoded as they stand either way.
    """

    kind: Literal["task", "hf"] = "task"
    path: str | None = None
    chat_template: Literal["auto", "none"] = "auto"


# How a model runs, not what it computes: a resume or an export may change these. Every other
# ModelConfig field is architecture (a field added later is architecture unless listed here).
EXECUTION_FIELDS = ("remat", "compute_dtype", "attention_impl", "hf_path", "logits_chunk_bytes")
# How the params are laid out: an export is converted between layouts, a training-state
# checkpoint is not (its optimiser state has the same layout).
LAYOUT_FIELDS = ("scan_layers", "vocab_pad_multiple")
# Fields older exports and checkpoints carry that ModelConfig no longer has (dropout was the
# stage's setting, copied into the model config).
_LEGACY_MODEL_FIELDS = ("dropout",)


def model_config_from_dict(data: dict[str, Any], source: str) -> ModelConfig:
    """The strict, typed read of a saved model config (an export's ``export.json``, a
    checkpoint's metadata): unknown and ill-typed fields are errors naming ``source``;
    fields the saved config lacks take today's defaults."""
    import dacite

    data = {k: v for k, v in data.items() if k not in _LEGACY_MODEL_FIELDS}
    data.setdefault("scan_layers", False)  # written before the field existed: unrolled (not "auto")
    try:
        return dacite.from_dict(ModelConfig, data, config=dacite.Config(strict=True, cast=[tuple]))
    except dacite.DaciteError as err:
        raise ConfigError(f"{source}: invalid model config: {err}") from err


def architecture_differences(saved: ModelConfig, current: ModelConfig,
                             include_layout: bool = False) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, current)}`` for each architecture field that differs: the one rule
    for "same model" (a resume and an export load both use it). ``include_layout`` also
    compares :data:`LAYOUT_FIELDS`, for a training-state checkpoint."""
    ignored = set(EXECUTION_FIELDS) | (set() if include_layout else set(LAYOUT_FIELDS))
    # the layout is compared resolved: "auto" on 24 layers is the same layout as True
    value = lambda cfg, name: cfg.stacked if name == "scan_layers" else getattr(cfg, name)  # noqa: E731
    return {f.name: (value(saved, f.name), value(current, f.name)) for f in dataclasses.fields(ModelConfig)
            if f.name not in ignored and value(saved, f.name) != value(current, f.name)}
