"""Attention dispatch: every (impl, backend, dtype, batch layout) choice and refusal, and the
paths' numbers on CPU: lengths + is_causal (what cuDNN is asked) == the mask == the chunks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, steps
from rlhf_jax.config import ConfigError, ModelConfig
from rlhf_jax.models import LanguageModel, ScalarModel, attention
from rlhf_jax.types import RankingBatch
from tests.helpers import assert_f32_close

HEAD_DIM = 32

# (impl, backend, compute_dtype, right_padded) -> path. Written out rather than derived, so
# the test states the table docs/attention.md gives.
TABLE = [
    ("default", "cpu", "float32", False, "chunked"),
    ("default", "cpu", "float32", True, "chunked"),
    ("default", "cpu", "bfloat16", False, "chunked"),
    ("default", "cpu", "bfloat16", True, "chunked"),
    ("default", "gpu", "float32", False, "xla"),
    ("default", "gpu", "float32", True, "xla"),  # cuDNN takes no float32: fall back
    ("default", "gpu", "bfloat16", False, "xla"),  # packed / left-padded: the mask
    ("default", "gpu", "bfloat16", True, "cudnn"),
    ("default", "cuda", "bfloat16", True, "cudnn"),
    ("default", "tpu", "float32", False, "xla"),
    ("default", "tpu", "bfloat16", True, "xla"),
    ("cudnn", "gpu", "bfloat16", True, "cudnn"),
    ("cudnn", "gpu", "float16", True, "cudnn"),
    ("cudnn", "gpu", "bfloat16", False, "xla"),  # never a wrong mask: packed rows keep it
    ("xla", "cpu", "float32", False, "xla"),
    ("xla", "gpu", "bfloat16", True, "xla"),
    ("xla", "tpu", "bfloat16", True, "xla"),
    ("chunked", "cpu", "float32", True, "chunked"),
    ("chunked", "gpu", "bfloat16", True, "chunked"),
    ("chunked", "tpu", "float32", False, "chunked"),
]


@pytest.mark.parametrize("impl, backend, dtype, right_padded, path", TABLE)
def test_choose_attention_table(impl, backend, dtype, right_padded, path):
    assert attention.choose_attention(impl, backend, dtype, HEAD_DIM, right_padded) == path


@pytest.mark.parametrize("backend, dtype, head_dim, message", [
    ("cpu", "bfloat16", 32, r"model.attention_impl='cudnn' needs a CUDA GPU, but JAX's backend is 'cpu'"),
    ("tpu", "bfloat16", 32, r"needs a CUDA GPU, but JAX's backend is 'tpu'"),
    ("gpu", "float32", 32, r"model.attention_impl='cudnn': .*model.compute_dtype in \['bfloat16', 'float16'\], "
                           r"got 'float32'"),
    ("gpu", "bfloat16", 12, r"model.attention_impl='cudnn': .*multiple of 8 and at most 256, got 12"),
    ("gpu", "bfloat16", 512, r"at most 256, got 512"),
], ids=["cpu", "tpu", "float32", "head-dim-12", "head-dim-512"])
def test_explicit_cudnn_is_refused_where_it_cannot_run(backend, dtype, head_dim, message):
    for right_padded in (True, False):  # refused whatever the batch: it could never run
        with pytest.raises(ConfigError, match=message):
            attention.choose_attention("cudnn", backend, dtype, head_dim, right_padded)


def test_default_falls_back_on_a_head_dim_cudnn_does_not_take():
    assert attention.choose_attention("default", "gpu", "bfloat16", 12, True) == "xla"
    assert attention.choose_attention("default", "gpu", "bfloat16", 128, True) == "cudnn"


def test_unknown_impl_and_float32_cudnn_config_are_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"model.attention_impl must be one of .*got 'flash'"):
        attention.choose_attention("flash", "gpu", "bfloat16", HEAD_DIM, True)
    with pytest.raises(ConfigError, match=r"rm.model.attention_impl='cudnn': .*rm.model.compute_dtype"):
        ModelConfig(attention_impl="cudnn").validate("rm.model")  # float32 compute by default
    ModelConfig(attention_impl="cudnn", compute_dtype="bfloat16").validate()


def _right_padded_qkv(t=150, kv_heads=2, heads=4):
    """q [3, t, heads, D], k/v [3, t, kv_heads, D]; rows of t, 97 and 40 tokens, then padding."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (3, t, heads, 16))
    k = jax.random.normal(keys[1], (3, t, kv_heads, 16))
    v = jax.random.normal(keys[2], (3, t, kv_heads, 16))
    segments = (jnp.arange(t)[None, :] < jnp.array([[t], [97], [40]])).astype(jnp.int32)
    return q, k, v, segments


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_lengths_path_equals_the_mask_paths_on_right_padded_rows(kv_heads):
    """What the cuDNN path asks (is_causal + per-row lengths) computed by XLA on CPU equals
    the mask path and the chunked path, outputs and gradients, across chunk boundaries."""
    q, k, v, segments = _right_padded_qkv(kv_heads=kv_heads)
    real = (segments > 0)[:, :, None, None]

    def run(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.where(real, out, 0.0) ** 2), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        assert np.isfinite(np.asarray(out)).all()  # padding rows too: they reach the losses
        return np.where(real, out, 0.0), grads

    mask = attention.segment_mask(segments)
    lengths = attention.right_padded_lengths(segments)
    t = q.shape[1]  # float32: the scores (head dim 16), the softmax and the weighted values (t each)
    forward, backward = [16, t, t], [16, t, t, t, 16, t]  # (tests.helpers.f32_rtol)
    lengths_out, lengths_grads = run(lambda q, k, v: attention.length_attention(q, k, v, lengths, "xla"))
    for path in ("xla", "chunked"):
        out, grads = run(lambda q, k, v, path=path: attention.self_attention(path, q, k, v, segments))
        assert_f32_close(out, lengths_out, forward, err_msg=path)
        for name, a, b in zip("qkv", grads, lengths_grads):
            assert_f32_close(a, b, backward, err_msg=f"{path} d{name}")
    assert_f32_close(np.where(real, attention.masked_attention(q, k, v, mask), 0.0), lengths_out, forward)
    np.testing.assert_array_equal(attention.right_padded_lengths(segments), [150, 97, 40])


def test_lengths_path_is_wrong_for_packed_rows_which_is_why_it_is_never_guessed():
    """Two packed segments in a row: lengths would let the second attend to the first."""
    q, k, v, _ = _right_padded_qkv(t=12)
    packed = jnp.array([[1] * 5 + [2] * 7] * 3, jnp.int32)
    by_mask = attention.self_attention("xla", q, k, v, packed)
    by_lengths = attention.length_attention(q, k, v, attention.right_padded_lengths(packed), "xla")
    assert not np.allclose(by_mask[:, 5:], by_lengths[:, 5:], atol=1e-3)
    assert_f32_close(by_mask[:, :5], by_lengths[:, :5], [16, 12, 12])  # the first segment: same keys


CFG = ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=32,
                  compute_dtype="bfloat16")


def bf16_tolerance(cfg: ModelConfig, reference) -> float:
    """How far two bfloat16-compute forward passes that differ only in how their attention is
    masked may differ: the f32 sums inside may add up in other orders, which can move each
    rounding of a result to bfloat16 (2**-8 relative) by one step: 9 roundings a layer (q, k,
    v, scores, probabilities, output projection, the MLP's three) and the head's, at the
    scale of ``reference`` (the largest magnitude in it)."""
    return (9 * cfg.n_layers + 1) * 2.0 ** -8 * float(np.max(np.abs(np.asarray(reference, np.float32))))


@pytest.mark.parametrize("layout", [dict(), dict(scan_layers=True, remat=True)], ids=["unrolled", "scanned-remat"])
def test_the_model_takes_the_lengths_path_only_when_the_caller_declares_right_padding(monkeypatch, layout):
    """On a (pretended) GPU in bfloat16, ``right_padded=True`` routes every layer through
    ``length_attention`` (run by XLA here, as cuDNN is not on a CPU) and gives the mask path's
    logits; without the declaration no layer goes there."""
    cfg = dataclasses.replace(CFG, **layout)
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 20), 1, 61)
    segments = (jnp.arange(20)[None, :] < jnp.array([[20], [13], [6]])).astype(jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    calls, lengths_attention = [], attention.length_attention

    def xla_lengths(q, k, v, lengths, implementation="cudnn"):
        calls.append(implementation)
        return lengths_attention(q, k, v, lengths, "xla")

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "length_attention", xla_lengths)
    by_mask = model.apply({"params": params}, tokens, segment_ids=segments)[0]
    assert calls == []
    by_lengths = model.apply({"params": params}, tokens, segment_ids=segments, right_padded=True)[0]
    assert calls and set(calls) == {"cudnn"}  # what the real path would have asked for
    valid = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(by_lengths)[valid], np.asarray(by_mask)[valid], rtol=0,
                               atol=bf16_tolerance(cfg, by_mask[valid]))


def test_an_all_padding_row_is_given_length_one():
    segments = jnp.array([[1, 1, 0], [0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(attention.right_padded_lengths(segments), [2, 1])


def test_the_reward_model_takes_the_lengths_path_and_missing_responses_stay_finite(monkeypatch):
    """RankingBatch rows are one response from position 0, then padding, and a prompt with
    fewer than k_max responses has all-padding rows. On a (pretended) GPU in bfloat16 the RM's
    forward pass takes the lengths path, its rewards and loss gradients equal the mask path's,
    and nothing is NaN although the stand-in below returns NaN for a zero-length row, as cuDNN
    before 9.25 does: an all-padding row is given length 1."""
    t = 16
    lengths = np.array([[16, 9, 5], [12, 7, 0]])  # the second prompt has two responses
    segments = (np.arange(t) < lengths[..., None]).astype(np.int32)
    batch = RankingBatch(tokens=jax.random.randint(jax.random.key(2), (2, 3, t), 1, 61) * segments,
                         segment_ids=jnp.asarray(segments),
                         positions=jnp.asarray(np.where(segments, np.arange(t), 0)),
                         response_mask=jnp.asarray(segments, jnp.float32),
                         last_index=jnp.asarray(np.maximum(lengths - 1, 0)),
                         ranks=jnp.array([[0, 1, 2], [1, 0, 0]]), mask=jnp.asarray(lengths > 0))
    params = jax.jit(ScalarModel(CFG).init)(jax.random.key(0), batch.tokens[:, 0])["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # a head that is not zero, so rewards differ

    def loss_and_grads(cfg):
        def loss(params):
            rewards = steps.ranking_rewards(ScalarModel(cfg), params, batch)
            return losses.ranking_loss(rewards, batch.ranks, batch.mask)[0], rewards
        return jax.value_and_grad(loss, has_aux=True)(params)

    calls, lengths_attention = [], attention.length_attention

    def cudnn_before_9_25(q, k, v, lengths, implementation="cudnn"):
        calls.append(implementation)
        out = lengths_attention(q, k, v, lengths, "xla")
        return jnp.where((lengths == 0)[:, None, None, None], jnp.nan, out)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    (mask_loss, mask_rewards), mask_grads = loss_and_grads(dataclasses.replace(CFG, attention_impl="xla"))
    assert calls == []
    monkeypatch.setattr(attention, "length_attention", cudnn_before_9_25)
    (loss, rewards), grads = loss_and_grads(CFG)
    assert calls and set(calls) == {"cudnn"}
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(rewards)).all()
    real = lengths > 0
    np.testing.assert_allclose(np.asarray(rewards)[real], np.asarray(mask_rewards)[real], rtol=0,
                               atol=bf16_tolerance(CFG, np.asarray(mask_rewards)[real]))
    # the loss is a log-sigmoid of reward differences (slope at most 1): the rewards' bound twice
    np.testing.assert_allclose(float(loss), float(mask_loss), rtol=0,
                               atol=2 * bf16_tolerance(CFG, np.asarray(mask_rewards)[real]))
    scale = max(float(np.max(np.abs(np.asarray(g, np.float32)))) for g in jax.tree.leaves(mask_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(mask_grads)):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0,
                                   atol=2 * bf16_tolerance(CFG, scale))  # the backward pass's roundings too
