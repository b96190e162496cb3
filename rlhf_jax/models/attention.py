"""Attention cores and the one place that picks between them (:func:`choose_attention`).

Layouts: queries ``[B, T, H, D]``, keys and values ``[B, S, K, D]`` (H = K * G query heads
per kv head), as ``jax.nn.dot_product_attention`` takes them; the cache is heads-major.

Paths of a forward pass without a KV cache (``ModelConfig.attention_impl``; docs/attention.md):

- ``chunked``: :func:`causal_chunked_attention`, the mask path by query chunks (CPU's fastest).
- ``xla``: :func:`masked_attention`, ``jax.nn.dot_product_attention(implementation="xla")``
  with the full ``[B, 1, T, T]`` mask: any segment layout (packed rows, left padding).
- ``cudnn``: :func:`length_attention`, cuDNN flash attention with ``is_causal=True`` and
  per-row lengths: never builds the mask, but it can only say "causal, then right padding",
  so it is chosen only for batches whose caller declares every row one right-padded segment.
- ``splash``: :func:`rlhf_jax.models.splash.splash_attention`, Pallas' fused TPU kernel over
  segment ids (any layout, as the mask), for sequences a multiple of 128 tokens.

With a cache (prefill and decode), :func:`cached_attention` always takes the mask: a
left-padded prompt in the cache is not "causal plus right padding".
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from rlhf_jax.config import ConfigError
from rlhf_jax.config.model import cudnn_refusal
from rlhf_jax.models.splash import splash_attention, splash_refusal

Array = jax.Array

ATTENTION_IMPLS = ("default", "xla", "cudnn", "chunked", "splash")
# Query chunk of the chunked attention path: 64 measured fastest on CPU at T = 256
# (32: 51 ms, 64: 50 ms, 128: 56 ms, forward + backward, B 8, 8 heads of 64).
ATTENTION_CHUNK = 64


_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target", default=None)


def target_backend() -> str:
    """The backend a traced program is for: ``jax.default_backend()``, unless
    :func:`compiling_for` says otherwise (a TPU program compiled ahead of time on a CPU)."""
    return _TARGET_BACKEND.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(backend: str):
    """Programs traced inside pick their attention for ``backend`` (e.g. ``"tpu"``), not
    for the machine that traces them: ``rlhf_jax.aot`` compiles TPU programs on a CPU."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def choose_attention(impl: str, backend: str, compute_dtype: str, head_dim: int, right_padded: bool,
                     seq_len: int | None = None) -> str:
    """The attention path (``"chunked"``, ``"xla"``, ``"cudnn"`` or ``"splash"``) of a forward
    pass without a KV cache. Pure, so every combination is testable on CPU.

    impl: ``ModelConfig.attention_impl``; backend: ``jax.default_backend()`` (``cpu``,
    ``gpu``/``cuda``, ``tpu``); compute_dtype: ``ModelConfig.compute_dtype``; head_dim:
    ``ModelConfig.dim_per_head``; right_padded: the caller declares that every row is ONE
    segment from position 0 followed only by padding (``segment_ids`` ``[1]*n + [0]*(T-n)``),
    which is what ``is_causal`` plus lengths can express. Packed rows or left padding are not,
    and whether a batch has them is data, unknown while tracing, so it is never guessed.

    seq_len: tokens per row (splash tiles them in blocks of 128; None: unknown).

    ``default``: chunked on CPU; cudnn on a GPU for right-padded batches in half precision
    with a head dim cuDNN takes; splash on TPU when the length is a multiple of 128 (any
    batch layout: it reads segment ids); xla otherwise (GPU float32, packed or left-padded
    rows; short TPU sequences).
    ``cudnn``: cudnn for right-padded batches, the xla mask path for the others (never a
    wrong mask); a ConfigError where cuDNN can never run (not a CUDA GPU, float32 compute,
    an unsupported head dim). ``splash``: splash where the length allows, else xla; a
    ConfigError off TPU. ``xla``/``chunked``: always that path.
    """
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl must be one of {list(ATTENTION_IMPLS)}, got {impl!r}")
    if impl in ("xla", "chunked"):
        return impl
    if impl == "splash" or (impl == "default" and backend == "tpu"):
        if backend != "tpu":
            raise ConfigError(f"model.attention_impl='splash' needs a TPU, but JAX's backend is {backend!r}; "
                              "use 'default' (chunked on CPU, cuDNN or XLA on GPUs)")
        return "xla" if splash_refusal(seq_len) else "splash"
    on_gpu = backend in ("gpu", "cuda")
    refusal = cudnn_refusal(compute_dtype, head_dim)
    if impl == "cudnn":
        if not on_gpu:
            raise ConfigError(f"model.attention_impl='cudnn' needs a CUDA GPU, but JAX's backend is "
                              f"{backend!r}; use 'default' (chunked on CPU, XLA on TPU)")
        if refusal:
            raise ConfigError(f"model.attention_impl='cudnn': {refusal}; use 'default' or 'xla'")
        return "cudnn" if right_padded else "xla"
    if backend == "cpu":
        return "chunked"
    return "cudnn" if on_gpu and refusal is None and right_padded else "xla"


def segment_mask(segment_ids: Array) -> Array:
    """``[B, T, T] bool``: query t sees key s when both are in the same (non-padding)
    segment and s <= t. segment_ids ``[B, T] int32``, 0 = padding."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    return same & causal & (segment_ids[:, None, :] > 0)


def masked_attention(q: Array, key: Array, value: Array, mask: Array) -> Array:
    """The XLA path with an explicit mask: q ``[B, T, H, D]``; key, value ``[B, T, K, D]``;
    mask ``[B, T, T] bool``. Returns ``[B, T, H, D]``."""
    return jax.nn.dot_product_attention(q, key.astype(q.dtype), value.astype(q.dtype), mask=mask[:, None],
                                        implementation="xla")


def right_padded_lengths(segment_ids: Array) -> Array:
    """``[B] int32``: tokens per row, i.e. where a right-padded row's padding starts, and at
    least 1. An all-padding row (a batch's padding rows at the end of a pass, a comparison's
    missing responses) is given its first slot, because cuDNN before 9.25 returns NaN for a
    zero-length row, and a NaN there reaches the gradients through the masked loss (0 * NaN)
    even though the row's output is unused."""
    return jnp.maximum(jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32), 1)


def length_attention(q: Array, key: Array, value: Array, lengths: Array,
                     implementation: str = "cudnn") -> Array:
    """Causal attention over right-padded rows, from lengths rather than a mask: q
    ``[B, T, H, D]``; key, value ``[B, T, K, D]``; lengths ``[B] int32`` (from
    :func:`right_padded_lengths`: row b is one segment of ``lengths[b]`` tokens, then
    padding). Returns ``[B, T, H, D]``; rows past a row's length are padding (their output is
    unused). ``implementation="xla"`` runs the same call on CPU, which is how the tests check
    what cuDNN is asked to compute."""
    return jax.nn.dot_product_attention(q, key.astype(q.dtype), value.astype(q.dtype), is_causal=True,
                                        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        implementation=implementation)


def _attend(grouped_q: Array, keys: Array, values: Array, mask: Array) -> Array:
    """The attention core, heads-major: grouped_q ``[B, K, G, T, D]``; keys, values
    ``[B, K, S, D]``; mask ``[B, T, S] bool``. Returns ``[B, K, G, T, D]``. Softmax in f32;
    a query with no visible slot (padding) averages the S slots it was given (as
    ``jax.nn.dot_product_attention`` averages all); its output is unused. The matmuls return
    the compute dtype (as that function's XLA path does): the CPU backend has no
    bf16 x bf16 -> f32 dot, and accelerators accumulate bf16 dots in f32 anyway."""
    d = grouped_q.shape[-1]
    dtype = grouped_q.dtype
    scores = jnp.einsum("bkgtd,bksd->bkgts", grouped_q, keys.astype(dtype)).astype(jnp.float32) * d ** -0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, values.astype(dtype))


def _heads_major(q: Array, kv_heads: int) -> Array:
    """``[B, T, H, D]`` -> ``[B, K, G, T, D]`` (H = K * G query heads per kv head)."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _tokens_major(out: Array) -> Array:
    """``[B, K, G, T, D]`` -> ``[B, T, H, D]``."""
    b, k, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


def cached_attention(q: Array, keys: Array, values: Array, mask: Array) -> Array:
    """Attention of new tokens to a cache layer: q ``[B, T, H, D]``; keys, values
    ``[B, K, S, D]`` (H = K * groups); mask ``[B, T, S] bool``. Returns ``[B, T, H, D]``."""
    return _tokens_major(_attend(_heads_major(q, keys.shape[1]), keys, values, mask))


def causal_chunked_attention(q: Array, key: Array, value: Array, mask: Array, chunk: int) -> Array:
    """Causal self-attention by query chunks: q ``[B, T, H, D]``; key, value ``[B, T, K, D]``;
    mask ``[B, T, T] bool``, which must be causal. Returns ``[B, T, H, D]``.

    Queries ``[i, i + chunk)`` only see keys ``[0, i + chunk)``, so the blocks above the
    diagonal are never computed: at T = 256 and chunk 64 that is 5/8 of the score matrix.
    Measured on a 2-core CPU (B 8, T 256, 8 heads of 64, f32, forward + backward): 46 ms
    against 94 ms for ``jax.nn.dot_product_attention``'s XLA path, which builds all T x T
    scores in a ``[B, T, H, D]`` layout that its batched matmuls must transpose."""
    t = q.shape[1]
    grouped = _heads_major(q, key.shape[2])
    keys, values = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        outs.append(_attend(grouped[:, :, :, start:end], keys[:, :, :end], values[:, :, :end],
                            mask[:, start:end, :end]))
    return _tokens_major(jnp.concatenate(outs, axis=3))


def self_attention(path: str, q: Array, key: Array, value: Array, segment_ids: Array) -> Array:
    """Causal self-attention of a forward pass without a cache by ``path`` (from
    :func:`choose_attention`): q ``[B, T, H, D]``; key, value ``[B, T, K, D]``; segment_ids
    ``[B, T] int32``. Returns ``[B, T, H, D]``."""
    if path == "cudnn":
        return length_attention(q, key, value, right_padded_lengths(segment_ids), "cudnn")
    if path == "splash":
        return splash_attention(q, key, value, segment_ids)
    mask = segment_mask(segment_ids)
    if path == "chunked":
        return causal_chunked_attention(q, key, value, mask, ATTENTION_CHUNK)
    if path == "xla":
        return masked_attention(q, key, value, mask)
    raise ValueError(f"unknown attention path {path!r}")
