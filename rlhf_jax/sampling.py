"""A jit-compiled sampler: prefill the KV cache with the prompts, then a ``lax.while_loop``
decodes one token per iteration for every row, stopping each row at EOS and the whole loop
as soon as every row is done. Shapes are fixed by (batch, prompt length, max new tokens),
so calling it again never recompiles, and no token goes back to the host until the end.

Prompts are left-padded (``segment_ids`` 0 on padding), so every row's last prompt token
sits at the same position and decoding advances all rows together.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.config import SamplingConfig
from rlhf_jax.models import KVCache, positions_from_segments
from rlhf_jax.models.transformer import KV_CACHE_LOGICAL_AXES

Array = jax.Array


@struct.dataclass
class Samples:
    """Sampled responses to a batch of prompts.

    prompt_tokens, prompt_segments: ``[B, P]`` (left-padded);
    tokens: ``[B, N] int32`` (after EOS: pad); logprobs: ``[B, N] f32`` under the sampling
    distribution's temperature (0 where masked); mask: ``[B, N] bool``, response tokens
    including the EOS; ended: ``[B] bool``, the row emitted EOS.
    """

    prompt_tokens: Array
    prompt_segments: Array
    tokens: Array
    logprobs: Array
    mask: Array
    ended: Array

    def full_sequences(self) -> tuple[Array, Array, Array]:
        """(tokens, segment_ids, positions), each ``[B, P+N]``: prompt then response."""
        tokens = jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)
        segments = jnp.concatenate([self.prompt_segments, self.mask.astype(jnp.int32)], axis=1)
        return tokens, segments, positions_from_segments(segments)


def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf. ``[B, V]``."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep a token if the mass before it is < top_p (so the top token is always kept)
        keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def choose_tokens(logits: Array, rng: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
    """Next tokens ``[B] int32`` and their log-probs ``[B] f32`` from logits ``[B, V]``."""
    if cfg.temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / cfg.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        tokens = jax.random.categorical(rng, filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@struct.dataclass
class _DecodeState:
    step: Array  # tokens chosen so far; the last one is not in the cache yet
    cache: KVCache
    tokens: Array
    logprobs: Array
    mask: Array
    done: Array


def sample(model: nn.Module, params: Any, prompt_tokens: Array, prompt_segments: Array, rng: Array,
           cfg: SamplingConfig, eos_id: int, pad_id: int) -> Samples:
    """Samples up to ``cfg.max_new_tokens`` tokens after each prompt (traceable; see
    :func:`make_sampler` for the jitted, sharded version). Token i is drawn with
    ``fold_in(rng, i)``; the prefill gives token 0's logits and each decode forward, over the
    token just chosen, the next one's, so N new tokens take N - 1 decode forwards."""
    batch, prompt_len = prompt_tokens.shape
    n_new = cfg.max_new_tokens
    if n_new < 1:
        raise ValueError(f"sampling.max_new_tokens must be >= 1, got {n_new}")
    cache = KVCache.init(model.cfg, batch, prompt_len + n_new)
    cache = jax.tree.map(nn.with_logical_constraint, cache, KV_CACHE_LOGICAL_AXES)
    prompt_positions = positions_from_segments(prompt_segments)
    logits, cache = model.apply({"params": params}, prompt_tokens, prompt_positions, prompt_segments, cache=cache,
                                logits_from=prompt_len - 1)  # only the last prompt position's logits are read
    next_position = prompt_positions[:, -1] + 1  # [B]

    def choose(state: _DecodeState, logits: Array) -> _DecodeState:
        """Records token ``state.step`` drawn from ``logits [B, V]`` (pad after EOS)."""
        token, logp = choose_tokens(logits, jax.random.fold_in(rng, state.step), cfg)
        live = ~state.done
        token = jnp.where(live, token, pad_id)
        return state.replace(step=state.step + 1, tokens=state.tokens.at[:, state.step].set(token),
                             logprobs=state.logprobs.at[:, state.step].set(jnp.where(live, logp, 0.0)),
                             mask=state.mask.at[:, state.step].set(live), done=state.done | (token == eos_id))

    def cond(state: _DecodeState):
        return (state.step < n_new) & ~jnp.all(state.done)

    def body(state: _DecodeState):
        last = state.step - 1
        logits, cache = model.apply({"params": params}, state.tokens[:, last, None], (next_position + last)[:, None],
                                    state.mask[:, last, None].astype(jnp.int32), cache=state.cache)
        return choose(state.replace(cache=cache), logits[:, -1])

    init = _DecodeState(step=jnp.zeros((), jnp.int32), cache=cache,
                        tokens=jnp.full((batch, n_new), pad_id, jnp.int32),
                        logprobs=jnp.zeros((batch, n_new), jnp.float32),
                        mask=jnp.zeros((batch, n_new), bool), done=jnp.zeros((batch,), bool))
    final = jax.lax.while_loop(cond, body, choose(init, logits[:, -1]))
    return Samples(prompt_tokens=prompt_tokens, prompt_segments=prompt_segments, tokens=final.tokens,
                   logprobs=final.logprobs, mask=final.mask, ended=final.done)


def make_sampler(model: nn.Module, cfg: SamplingConfig, mesh: Mesh, param_shardings: Any,
                 eos_id: int, pad_id: int) -> Callable[[Any, Array, Array, Array], Samples]:
    """``sampler(params, prompt_tokens [B, P], prompt_segments [B, P], rng) -> Samples``,
    jitted with params in their shardings and the batch split over (data, fsdp)."""

    batch = sharding.batch_sharding(mesh, 1)

    def run(params, prompt_tokens, prompt_segments, rng):
        return sample(model, params, prompt_tokens, prompt_segments, rng, cfg, eos_id, pad_id)

    return sharding.jit_under_mesh(run, mesh, in_shardings=(param_shardings, batch, batch, sharding.replicated(mesh)),
                          out_shardings=batch)
