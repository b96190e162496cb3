"""One decoder-only transformer covering the GPT-2 and Llama families.

Parameters and activations carry logical axis names only (``batch, length, embed,
act_embed, mlp, heads, kv_heads, kv, vocab, norm, positions, layers``); ``rlhf_jax.sharding`` maps them to the mesh.
Attention goes through ``jax.nn.dot_product_attention`` so accelerators get fused kernels.

Masking: ``segment_ids`` ``[B, T] int32`` marks which example each token belongs to
(0 = padding). A token attends to earlier tokens of its own segment, which covers padding
and packed rows alike. With a :class:`KVCache`, a token attends to every valid cache slot
at or before its own slot.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.config import ModelConfig

Array = jax.Array


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    keys, values: ``[L, B, S, K, D]`` (layers, batch, slots, kv heads, head dim).
    valid: ``[B, S] bool``, slots that hold a real (non-padding) token.
    index: ``[] int32``, the next slot to write; all rows advance together.
    """

    keys: Array
    values: Array
    valid: Array
    index: Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
        shape = (cfg.n_layers, batch, slots, cfg.kv_heads, cfg.dim_per_head)
        dtype = jnp.dtype(cfg.compute_dtype)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


KV_CACHE_LOGICAL_AXES = KVCache(
    keys=("layers", "batch", "length", "kv_heads", "kv"),
    values=("layers", "batch", "length", "kv_heads", "kv"),
    valid=("batch", "length"),
    index=(),
)


def positions_from_segments(segment_ids: Array) -> Array:
    """``[B, T] int32``: position of each token within its segment (0 for padding)."""
    is_token = segment_ids > 0
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    idx = jnp.arange(segment_ids.shape[1])[None, :]
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(is_token, idx - start_idx, 0).astype(jnp.int32)


def _init(init_fn, names):
    return nn.with_logical_partitioning(init_fn, names)


class Dense(nn.Module):
    """Contracts the last ``len(in_axes)`` dims of x with a kernel ``in_dims + features``.

    Written out (rather than ``nn.DenseGeneral``) so multi-dim kernels keep their logical
    names at full rank.
    """

    features: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_axes)
        shape = tuple(x.shape[-n_in:]) + tuple(self.features)
        kernel = self.param("kernel", _init(nn.initializers.normal(0.02), self.in_axes + self.out_axes),
                            shape, self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = self.param("bias", _init(nn.initializers.zeros, self.out_axes),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _dense(features, in_axes, out_axes, cfg, name, use_bias):
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features, tuple(in_axes), tuple(out_axes), use_bias,
                 jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype), name=name)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    kwargs = dict(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
                  name=name, scale_init=_init(nn.initializers.ones, ("norm",)))
    if cfg.family == "gpt2":
        return nn.LayerNorm(bias_init=_init(nn.initializers.zeros, ("norm",)), **kwargs)
    return nn.RMSNorm(**kwargs)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, half-split convention (as HF Llama). x: [B, T, H, D]; positions: [B, T]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache, cache_index, cache_valid):
        cfg = self.cfg
        bias = cfg.family == "gpt2" or cfg.qkv_bias
        h, k, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        q = _dense((h, d), ("embed",), ("heads", "kv"), cfg, "query", bias)(x)
        key = _dense((k, d), ("embed",), ("kv_heads", "kv"), cfg, "key", bias)(x)
        value = _dense((k, d), ("embed",), ("kv_heads", "kv"), cfg, "value", bias)(x)
        if cfg.family == "llama":
            q = rotary(q, positions, cfg.rope_theta)
            key = rotary(key, positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

        t = x.shape[1]
        if layer_cache is None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            causal = jnp.tril(jnp.ones((t, t), bool))[None]
            mask = same & causal & (segment_ids[:, None, :] > 0)
            new_cache = None
        else:
            cached_k, cached_v = layer_cache
            key = jax.lax.dynamic_update_slice_in_dim(cached_k, key.astype(cached_k.dtype), cache_index, 1)
            value = jax.lax.dynamic_update_slice_in_dim(cached_v, value.astype(cached_v.dtype), cache_index, 1)
            slots = jnp.arange(key.shape[1])
            query_slot = cache_index + jnp.arange(t)
            mask = cache_valid[:, None, :] & (slots[None, None, :] <= query_slot[None, :, None])
            new_cache = (key, value)
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "kv"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "kv"))
        impl = None if cfg.attention_impl == "default" else cfg.attention_impl
        out = jax.nn.dot_product_attention(q, key.astype(q.dtype), value.astype(q.dtype),
                                           mask=mask[:, None], implementation=impl)
        out = _dense(cfg.d_model, ("heads", "kv"), ("embed",), cfg, "out", cfg.family == "gpt2")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if cfg.family == "gpt2":
            hidden = _dense(cfg.d_ff, ("embed",), ("mlp",), cfg, "fc_in", True)(x)
            hidden = nn.gelu(hidden, approximate=True)  # GPT-2's "gelu_new"
        else:
            gate = _dense(cfg.d_ff, ("embed",), ("mlp",), cfg, "gate", False)(x)
            up = _dense(cfg.d_ff, ("embed",), ("mlp",), cfg, "up", False)(x)
            hidden = nn.silu(gate) * up
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return _dense(cfg.d_model, ("mlp",), ("embed",), cfg, "fc_out", cfg.family == "gpt2")(hidden)


class Block(nn.Module):
    """Pre-norm residual block; residual dropout after attention and after the MLP."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache, cache_index, cache_valid, deterministic):
        cfg = self.cfg
        attn, new_cache = Attention(cfg, name="attn")(
            _norm(cfg, "norm_attn")(x).astype(x.dtype), positions, segment_ids,
            layer_cache, cache_index, cache_valid)
        x = x + nn.Dropout(cfg.dropout)(attn, deterministic=deterministic)
        mlp = MLP(cfg, name="mlp")(_norm(cfg, "norm_mlp")(x).astype(x.dtype))
        x = x + nn.Dropout(cfg.dropout)(mlp, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_cache


class Decoder(nn.Module):
    """Token (+ learned position) embedding, ``n_layers`` blocks, final norm.

    ``__call__`` returns hidden states ``[B, T, d_model]`` (compute dtype) and the updated
    cache; ``attend`` maps hidden states to logits with the tied embedding.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                              embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        if cfg.family == "gpt2":
            self.position_embed = nn.Embed(
                cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                embedding_init=_init(nn.initializers.normal(0.01), ("positions", "embed")))
        block = Block
        if cfg.remat:
            block = nn.remat(Block, static_argnums=(7,),
                             policy=jax.checkpoint_policies.nothing_saveable)
        self.blocks = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = _norm(cfg, "final_norm")
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 deterministic: bool = True):
        """tokens ``[B, T] int32``; positions ``[B, T] int32`` (default: from segments);
        segment_ids ``[B, T] int32`` (default: all 1). Returns (hidden ``[B, T, E]``, cache)."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        x = self.embed(tokens)
        if self.cfg.family == "gpt2":
            x = x + self.position_embed(positions)
        x = self.dropout(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        cache_valid = None
        if cache is not None:
            cache_valid = jax.lax.dynamic_update_slice_in_dim(
                cache.valid, segment_ids > 0, cache.index, 1)
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_new = block(x, positions, segment_ids, layer_cache,
                                 None if cache is None else cache.index, cache_valid, deterministic)
            if cache is not None:
                new_keys.append(layer_new[0])
                new_values.append(layer_new[1])
        x = self.final_norm(x).astype(x.dtype)
        if cache is not None:
            cache = KVCache(keys=jnp.stack(new_keys), values=jnp.stack(new_values),
                            valid=cache_valid, index=cache.index + tokens.shape[1])
        return x, cache

    def attend(self, hidden):
        return self.embed.attend(hidden)
