"""One decoder-only transformer covering the GPT-2 and Llama families.

Parameters and activations carry logical axis names only (``batch, length, embed,
act_embed, mlp, heads, kv_heads, kv, vocab, norm, positions, layers``); ``rlhf_jax.sharding`` maps them to the mesh.
The attention core is picked by ``rlhf_jax.models.attention.choose_attention`` (chunked on
CPU, XLA's path or cuDNN flash attention on accelerators; docs/attention.md).

Masking: ``segment_ids`` ``[B, T] int32`` marks which example each token belongs to
(0 = padding). A token attends to earlier tokens of its own segment, which covers padding
and packed rows alike. With a :class:`KVCache`, a token attends to every valid cache slot
at or before its own slot.

Decoding cost (profiled on CPU, benchmarks/decode.py): a step must not copy the cache. Each
layer writes its new keys/values into the one cache array in place, and cached attention is
two einsums over a heads-major ``[B, K, S, D]`` layer slice, the layout the batched matmuls
read directly (with ``[B, S, K, D]`` XLA transposed every layer's cache every step, and a
per-layer slice + ``jnp.stack`` copied the whole cache: together 2x slower at batch 8).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.attention import cached_attention, choose_attention, self_attention, target_backend

Array = jax.Array


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    keys, values: ``[L, B, K, S, D]`` (layers, batch, kv heads, slots, head dim).
    valid: ``[B, S] bool``, slots that hold a real (non-padding) token.
    index: ``[] int32``, the next slot to write; all rows advance together.
    """

    keys: Array
    values: Array
    valid: Array
    index: Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.kv_heads, slots, cfg.dim_per_head)
        dtype = jnp.dtype(cfg.compute_dtype)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


KV_CACHE_LOGICAL_AXES = KVCache(
    keys=("layers", "batch", "kv_heads", "length", "kv"),
    values=("layers", "batch", "kv_heads", "length", "kv"),
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


def dense(features, in_axes, out_axes, cfg, name, use_bias):
    """A :class:`Dense` with logical ``in_axes`` -> ``out_axes`` in ``cfg``'s dtypes."""
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
    """Self-attention. With a cache, ``cache`` is ``(keys, values)`` of ALL layers
    (``[L, B, K, S, D]``): this layer writes its slots in place and returns both arrays.
    ``right_padded`` (static): the caller declares every row one segment then padding,
    which lets :func:`~rlhf_jax.models.attention.choose_attention` pick cuDNN on a GPU."""

    cfg: ModelConfig
    layer: int = 0  # this block's index into the cache's layer axis

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, cache_index, cache_valid, layer=None,
                 right_padded=False):
        cfg = self.cfg
        layer = self.layer if layer is None else layer  # traced under nn.scan
        bias = cfg.family == "gpt2" or cfg.qkv_bias
        h, k, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        q = dense((h, d), ("embed",), ("heads", "kv"), cfg, "query", bias)(x)
        key = dense((k, d), ("embed",), ("kv_heads", "kv"), cfg, "key", bias)(x)
        value = dense((k, d), ("embed",), ("kv_heads", "kv"), cfg, "value", bias)(x)
        if cfg.family == "llama":
            q = rotary(q, positions, cfg.rope_theta)
            key = rotary(key, positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

        t = x.shape[1]
        if cache is None:
            key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "kv"))
            value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "kv"))
            path = choose_attention(cfg.attention_impl, target_backend(), cfg.compute_dtype,
                                    cfg.dim_per_head, right_padded, seq_len=t)
            out = self_attention(path, q, key, value, segment_ids)
            new_cache = None
        else:  # prefill and decode: always the mask (a left-padded prompt is not lengths)
            all_k, all_v = cache
            at = (layer, 0, 0, cache_index, 0)  # [L, B, K, S, D]
            all_k = jax.lax.dynamic_update_slice(all_k, key.swapaxes(1, 2).astype(all_k.dtype)[None], at)
            all_v = jax.lax.dynamic_update_slice(all_v, value.swapaxes(1, 2).astype(all_v.dtype)[None], at)
            slots = jnp.arange(all_k.shape[3])
            query_slot = cache_index + jnp.arange(t)
            mask = cache_valid[:, None, :] & (slots[None, None, :] <= query_slot[None, :, None])
            out = cached_attention(q, all_k[layer], all_v[layer], mask)
            new_cache = (all_k, all_v)
        out = dense(cfg.d_model, ("heads", "kv"), ("embed",), cfg, "out", cfg.family == "gpt2")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if cfg.family == "gpt2":
            hidden = dense(cfg.d_ff, ("embed",), ("mlp",), cfg, "fc_in", True)(x)
            hidden = nn.gelu(hidden, approximate=True)  # GPT-2's "gelu_new"
        else:
            gate = dense(cfg.d_ff, ("embed",), ("mlp",), cfg, "gate", False)(x)
            up = dense(cfg.d_ff, ("embed",), ("mlp",), cfg, "up", False)(x)
            hidden = nn.silu(gate) * up
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(cfg.d_model, ("mlp",), ("embed",), cfg, "fc_out", cfg.family == "gpt2")(hidden)


class Block(nn.Module):
    """Pre-norm residual block; residual dropout after attention and after the MLP."""

    cfg: ModelConfig
    layer: int = 0
    dropout_rate: float = 0.0  # residual dropout while training (a stage setting, not architecture)

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, cache_index, cache_valid, deterministic,
                 right_padded=False, layer=None):
        cfg = self.cfg
        attn, new_cache = Attention(cfg, self.layer, name="attn")(
            _norm(cfg, "norm_attn")(x).astype(x.dtype), positions, segment_ids,
            cache, cache_index, cache_valid, layer, right_padded)
        x = x + nn.Dropout(self.dropout_rate)(attn, deterministic=deterministic)
        mlp = MLP(cfg, name="mlp")(_norm(cfg, "norm_mlp")(x).astype(x.dtype))
        x = x + nn.Dropout(self.dropout_rate)(mlp, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_cache


class Decoder(nn.Module):
    """Token (+ learned position) embedding, ``n_layers`` blocks, final norm.

    ``__call__`` returns hidden states ``[B, T, d_model]`` (compute dtype) and the updated
    cache; ``attend`` maps hidden states to logits with the tied embedding.
    """

    cfg: ModelConfig
    dropout_rate: float = 0.0  # embedding and residual dropout while training

    def setup(self):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        # padded_vocab_size rows (models.vocab): the tensor axis must divide the vocab axis
        self.embed = nn.Embed(cfg.padded_vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                              embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        if cfg.family == "gpt2":
            self.position_embed = nn.Embed(
                cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                embedding_init=_init(nn.initializers.normal(0.01), ("positions", "embed")))
        block = Block
        policy = cfg.remat_policy
        if policy is not None:
            # deterministic (7) and right_padded (8) are Python bools that pick code paths
            block = nn.remat(Block, static_argnums=(7, 8), policy=getattr(jax.checkpoint_policies, policy),
                             prevent_cse=not cfg.stacked)  # scan already prevents CSE
        if cfg.stacked:  # one Block whose params are stacked [L, ...] (see _run_scanned)
            self.layers = block(cfg, dropout_rate=self.dropout_rate, name="layers")
        else:
            self.blocks = [block(cfg, i, self.dropout_rate, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = _norm(cfg, "final_norm")
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 deterministic: bool = True, right_padded: bool = False):
        """tokens ``[B, T] int32``; positions ``[B, T] int32`` (default: from segments);
        segment_ids ``[B, T] int32`` (default: all 1). Returns (hidden ``[B, T, E]``, cache).

        right_padded (static): the caller declares that every row is one segment from
        position 0 followed only by padding (no packing, no left padding), so attention may
        use lengths instead of a mask (cuDNN on GPUs, see ``models.attention``). A wrong
        declaration gives a wrong mask on that path; False is always correct."""
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
        kv = None if cache is None else (cache.keys, cache.values)
        cache_index = None if cache is None else cache.index
        if self.cfg.stacked:
            x, kv = self._run_scanned(x, positions, segment_ids, kv, cache_index, cache_valid, deterministic,
                                      right_padded)
        else:
            for block in self.blocks:
                x, kv = block(x, positions, segment_ids, kv, cache_index, cache_valid, deterministic, right_padded)
        x = self.final_norm(x).astype(x.dtype)
        if cache is not None:
            cache = KVCache(keys=kv[0], values=kv[1], valid=cache_valid, index=cache.index + tokens.shape[1])
        return x, cache

    def _run_scanned(self, x, positions, segment_ids, kv, cache_index, cache_valid, deterministic, right_padded):
        """The blocks as one ``nn.scan`` over ``self.layers``: params (and dropout rngs) get a
        leading layer axis named ``layers``; the carry is the hidden state and the whole
        ``[L, ...]`` cache, which each layer updates in place at its (traced) index."""

        def body(block, carry, layer):
            h, cache_kv = carry
            h, cache_kv = block(h, positions, segment_ids, cache_kv, cache_index, cache_valid,
                                deterministic, right_padded, layer)
            return (h, cache_kv), None

        scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       length=self.cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        (x, kv), _ = scan(self.layers, (x, kv), jnp.arange(self.cfg.n_layers, dtype=jnp.int32))
        return x, kv

    def attend(self, hidden):
        return self.embed.attend(hidden)
