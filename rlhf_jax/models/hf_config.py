"""Hugging Face ``config.json`` <-> our :class:`~rlhf_jax.config.ModelConfig`, for GPT-2 and the
Llama family (Llama, Mistral, Qwen2): what a HF config describes that we can represent, and
the config an export writes. A config we cannot represent is refused naming the field."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from rlhf_jax.config import ConfigError, ModelConfig

LLAMA_TYPES = ("llama", "mistral", "qwen2")


class HFError(ValueError):
    """A HF checkpoint we cannot read or represent; names the file and field or tensor."""


# ---------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _get(hf: dict, key: str, path: pathlib.Path) -> Any:
    if key not in hf:
        raise HFError(f"{path}: missing field {key!r}")
    return hf[key]


def _require(hf: dict, key: str, default: Any, allowed: tuple, path: pathlib.Path, why: str) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFError(f"{path}: {key}={value!r} is not supported ({why})")


def _gpt2_config(hf: dict, path: pathlib.Path) -> ModelConfig:
    _require(hf, "activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"), path,
             "our GPT-2 MLP uses the tanh-approximate GELU")
    _require(hf, "scale_attn_weights", True, (True,), path, "attention is scaled by 1/sqrt(head_dim)")
    _require(hf, "scale_attn_by_inverse_layer_idx", False, (False,), path, "no per-layer attention scaling")
    _require(hf, "add_cross_attention", False, (False,), path, "decoder-only")
    d_model = _get(hf, "n_embd", path)
    return ModelConfig(
        family="gpt2", vocab_size=_get(hf, "vocab_size", path), d_model=d_model,
        n_layers=_get(hf, "n_layer", path), n_heads=_get(hf, "n_head", path),
        d_ff=hf.get("n_inner") or 4 * d_model, max_len=_get(hf, "n_positions", path),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), hf_path=str(path.parent))


def _rope_theta(hf: dict, path: pathlib.Path) -> float:
    """RoPE base; configs before transformers 5 use ``rope_theta`` + ``rope_scaling``,
    later ones ``rope_parameters``."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(field) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise HFError(f"{path}: {field}.rope_type={kind!r} is not supported (only unscaled RoPE)")
    for where in (hf, rope):
        if where.get("partial_rotary_factor", 1.0) != 1.0:
            raise HFError(f"{path}: partial_rotary_factor={where['partial_rotary_factor']} is not "
                          "supported (RoPE rotates the whole head)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_no_sliding_window(hf: dict, path: pathlib.Path, max_len: int) -> None:
    """A window at least ``max_position_embeddings`` long never masks anything: accept it."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        active = any(kind != "full_attention" for kind in layer_types)
    else:
        active = hf.get("use_sliding_window", True)
    if active and window is not None and window < max_len:
        raise HFError(f"{path}: sliding_window={window} is active (max_position_embeddings={max_len}); "
                      "sliding-window attention is not supported")


def _llama_config(hf: dict, path: pathlib.Path) -> ModelConfig:
    _require(hf, "hidden_act", "silu", ("silu", "swish"), path, "our Llama MLP is SwiGLU")
    _require(hf, "attention_bias", False, (False,), path, "the output projection has no bias")
    _require(hf, "mlp_bias", False, (False,), path, "the Llama MLP has no biases")
    d_model, n_heads = _get(hf, "hidden_size", path), _get(hf, "num_attention_heads", path)
    kv_heads = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim") or d_model // n_heads
    max_len = _get(hf, "max_position_embeddings", path)
    _check_no_sliding_window(hf, path, max_len)
    return ModelConfig(
        family="llama", vocab_size=_get(hf, "vocab_size", path), d_model=d_model,
        n_layers=_get(hf, "num_hidden_layers", path), n_heads=n_heads,
        n_kv_heads=None if kv_heads == n_heads else kv_heads,
        head_dim=None if head_dim * n_heads == d_model else head_dim,
        d_ff=_get(hf, "intermediate_size", path), max_len=max_len,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=hf["model_type"] == "qwen2", rope_theta=_rope_theta(hf, path),
        norm_eps=hf.get("rms_norm_eps", 1e-6), hf_path=str(path.parent))


def model_config_from_hf(directory: str | pathlib.Path) -> ModelConfig:
    """The :class:`ModelConfig` of the HF checkpoint in ``directory`` (its ``config.json``),
    with ``hf_path`` set to it. Raises :class:`HFError` naming the field for anything our
    model does not compute the same way."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise HFError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        cfg = _gpt2_config(hf, path)
    elif model_type in LLAMA_TYPES:
        cfg = _llama_config(hf, path)
    else:
        raise HFError(f"{path}: model_type={model_type!r} is not supported; "
                      f"supported: {['gpt2', *LLAMA_TYPES]}")
    try:
        cfg.validate()
    except ConfigError as err:
        raise HFError(f"{path}: {err}") from err
    return cfg


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as a HF causal LM (``gpt2``; ``llama``; ``qwen2`` when
    ``qkv_bias``, the one Llama-family type with q/k/v biases and no output bias)."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "dtype": cfg.param_dtype}
    if cfg.family == "gpt2":
        if cfg.dim_per_head * cfg.n_heads != cfg.d_model:
            raise HFError(f"model.head_dim={cfg.head_dim}: HF GPT-2 needs head_dim * n_heads == d_model")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True}
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    extra = {"use_sliding_window": False} if cfg.qkv_bias else {"attention_bias": False, "mlp_bias": False}
    return {"architectures": [arch], "model_type": model_type, **common, **extra,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
