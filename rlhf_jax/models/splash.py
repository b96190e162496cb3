"""Pallas splash attention, TPU's fused causal attention, over the stages' segment ids.

``jax.experimental.pallas.ops.tpu.splash_attention`` computes softmax attention block by
block in the TPU's VMEM, so neither the ``[B, H, T, T]`` scores nor the mask ever reach HBM:
the forward pass keeps the output and a ``[B, H, T]`` log-sum-exp, the backward pass
recomputes each block. Causality is a static ``CausalMask`` (blocks above the diagonal are
skipped); the data's layout comes in as ``SegmentIds``: a query sees a key of the same
segment id. That is exactly the mask of ``models.attention.segment_mask`` for real tokens
(segment > 0), for packed, left- and right-padded rows alike. Padding tokens (segment 0)
see earlier padding instead of nothing; their outputs are never read (no real token sees
them, the losses mask them), and no row is empty, so nothing is NaN.

The kernel runs per device inside ``shard_map``: batch and heads are split as the logical
rules split ``batch`` and ``heads``/``kv_heads``; the sequence is whole on every device.
It needs sequences a multiple of :data:`SPLASH_BLOCK_MIN` (128 lanes);
``models.attention.choose_attention`` falls back to XLA's path for others.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

# The kv block of the kernel must be a multiple of the TPU's 128 lanes.
SPLASH_BLOCK_MIN = 128
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the sequence (MaxText's default is 512)


def splash_refusal(seq_len: int | None) -> str | None:
    """Why splash attention cannot take a sequence of ``seq_len`` tokens (None: it can)."""
    if seq_len is None or seq_len % SPLASH_BLOCK_MIN:
        return f"splash attention needs a sequence length that is a multiple of {SPLASH_BLOCK_MIN}, got {seq_len}"
    return None


def _kernel(seq_len: int, heads: int, interpret: bool):
    """The splash kernel for ``heads`` query heads over ``seq_len`` tokens (causal). Made
    anew per trace: it holds the mask's block tables as arrays of that trace."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * heads)
    return kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _local_splash(q: Array, key: Array, value: Array, segment_ids: Array, interpret: bool) -> Array:
    """One device's share: q ``[b, T, h, D]``, key/value ``[b, T, k, D]``, segment_ids ``[b, T]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel

    t, h, d = q.shape[1], q.shape[2], q.shape[3]
    splash = _kernel(t, h, interpret)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [b, T, h, D] -> [b, h, T, D]
    scaled = heads_major(q * jnp.asarray(d ** -0.5, q.dtype))  # the kernel does not scale
    out = jax.vmap(lambda q1, k1, v1, s1: splash(q1, k1, v1, kernel.SegmentIds(s1, s1)))(
        scaled, heads_major(key.astype(q.dtype)), heads_major(value.astype(q.dtype)), segment_ids)
    return out.transpose(0, 2, 1, 3)


def splash_attention(q: Array, key: Array, value: Array, segment_ids: Array, interpret: bool = False) -> Array:
    """Causal self-attention within segments: q ``[B, T, H, D]``; key, value ``[B, T, K, D]``
    (H a multiple of K); segment_ids ``[B, T] int32`` (0 = padding). Returns ``[B, T, H, D]``.

    Under a mesh (``rlhf_jax.sharding.activate``), each device runs the kernel on its rows
    and heads; without one, the whole batch runs as one shard. ``interpret=True`` runs the
    kernel in Pallas' interpreter (any backend: how the tests check it on a CPU)."""
    mesh = jax.sharding.get_abstract_mesh()
    run = functools.partial(_local_splash, interpret=interpret)
    if mesh.empty:
        return run(q, key, value, segment_ids)
    q_spec = P(*nn.logical_to_mesh_axes(("batch", "length", "heads", "kv")))
    kv_spec = P(*nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "kv")))
    segment_spec = P(*nn.logical_to_mesh_axes(("batch", "length")))
    # check_vma=False: the kernel's pallas_call carries no varying-axes annotation
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                         check_vma=False)(q, key, value, segment_ids)
