"""Splash attention (the TPU kernel) run by Pallas' interpreter on the CPU: on every real
token it equals XLA's masked path, forward and backward, for right-padded, packed and
left-padded rows, on one device and split over a mesh by batch and heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.config import ConfigError, MeshConfig
from rlhf_jax.models import attention
from rlhf_jax.models.splash import splash_attention

T, HEADS, KV_HEADS, HEAD_DIM = 128, 4, 2, 16


def _segments(batch: int) -> np.ndarray:
    """Rows: right-padded (100 tokens), packed (60 + 50, then padding), left-padded (28
    padding, then 100 tokens), full, and all padding; repeated to ``batch`` rows."""
    rows = [[1] * 100 + [0] * 28, [1] * 60 + [2] * 50 + [0] * 18, [0] * 28 + [1] * 100, [1] * T, [0] * T]
    return np.array([rows[i % len(rows)] for i in range(batch)], np.int32)


def _inputs(batch: int):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, T, HEADS, HEAD_DIM))
    k = jax.random.normal(keys[1], (batch, T, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(keys[2], (batch, T, KV_HEADS, HEAD_DIM))
    weights = jax.random.normal(keys[3], (batch, T, HEADS, HEAD_DIM))  # a loss that reads every output
    return q, k, v, jnp.asarray(_segments(batch)), weights


def _loss(attend, q, k, v, segments, weights):
    real = (segments > 0)[:, :, None, None]  # padding queries' outputs are never read
    return jnp.sum(jnp.where(real, attend(q, k, v, segments) * weights, 0.0))


def _xla(q, k, v, segments):
    return attention.masked_attention(q, k, v, attention.segment_mask(segments))


def _splash(q, k, v, segments):
    return splash_attention(q, k, v, segments, interpret=True)


# Tolerance: f32 scores are dot products of HEAD_DIM = 16 products of N(0, 1) draws, so
# each differs by at most ~16 * eps32 * |q||k| ~ 3e-6 between the two summation orders;
# the online softmax (blocks of 128: one block here) rescales in f32 (a few eps). Outputs
# are convex combinations of |v| <= ~5, so they differ by ~5 * 4 * 3e-6 ~ 6e-5 at worst;
# gradients sum such terms over the 128 keys with |weights| ~ 1: 1e-4 relative.
ATOL, GRAD_RTOL = 6e-5, 1e-4


def _check_equal(batch, run):
    q, k, v, segments, weights = _inputs(batch)
    real = np.asarray(segments > 0)[:, :, None, None]
    out_splash, out_xla = run(_splash, q, k, v, segments), run(_xla, q, k, v, segments)
    np.testing.assert_allclose(np.where(real, out_splash, 0), np.where(real, out_xla, 0), atol=ATOL, rtol=0)
    grads = lambda attend: run(lambda *a: jax.grad(  # noqa: E731
        lambda q, k, v: _loss(attend, q, k, v, a[3], weights), argnums=(0, 1, 2))(*a[:3]), q, k, v, segments)
    for got, want in zip(grads(_splash), grads(_xla)):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, atol=GRAD_RTOL * scale, rtol=0)
    assert np.all(np.isfinite(out_splash))  # padding rows too: no row of the kernel is empty


def test_splash_equals_the_mask_path_on_one_device():
    _check_equal(5, lambda attend, *args: jax.jit(attend)(*args))


def test_splash_split_over_batch_and_heads_equals_the_mask_path(eight_devices):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # 4 batch shards, heads split in 2

    def run(attend, *args):
        with sharding.activate(mesh):
            return jax.jit(attend)(*args)

    _check_equal(8, run)


def test_default_takes_splash_on_tpu_for_lengths_it_tiles_and_xla_for_others():
    for right_padded in (True, False):  # segment ids: any layout
        assert attention.choose_attention("default", "tpu", "bfloat16", 64, right_padded, seq_len=2048) == "splash"
        assert attention.choose_attention("splash", "tpu", "float32", 64, right_padded, seq_len=256) == "splash"
        assert attention.choose_attention("default", "tpu", "bfloat16", 64, right_padded, seq_len=100) == "xla"
        assert attention.choose_attention("splash", "tpu", "bfloat16", 64, right_padded, seq_len=32) == "xla"
    assert attention.choose_attention("default", "cpu", "bfloat16", 64, True, seq_len=2048) == "chunked"
    with pytest.raises(ConfigError, match=r"attention_impl='splash' needs a TPU, but JAX's backend is 'cpu'"):
        attention.choose_attention("splash", "cpu", "float32", 64, True, seq_len=256)


def test_compiling_for_a_tpu_picks_its_attention_while_tracing_on_a_cpu():
    assert attention.target_backend() == "cpu"
    with attention.compiling_for("tpu"):
        assert attention.target_backend() == "tpu"
    assert attention.target_backend() == "cpu"
