"""The memory-lean loss path: next-token terms computed a chunk of logits at a time equal
the whole-logits computation (values and gradients), the train and eval steps give the same
numbers whatever the chunk, and a compiled loss holds one chunk of logits, not all."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import lm_terms, losses, sharding, steps
from rlhf_jax.config import MeshConfig
from rlhf_jax.models import LanguageModel
from rlhf_jax.types import TokenBatch
from tests.helpers import TINY_MODEL

B, T, E, V = 3, 37, 16, 50


def _problem():
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (B, T, E))
    weights = jax.random.normal(keys[1], (E, V)) * 2.0  # logits ~ N(0, 64): a peaked softmax
    tokens = jax.random.randint(keys[2], (B, T), 0, V)
    return hidden, weights, tokens


def _whole(hidden, weights, tokens, temperature):
    """Today's path: all [B, T, V] logits, then sft_loss / next_token_logprobs / entropy."""
    logits = (hidden @ weights) / temperature
    return (losses.next_token_logprobs(logits, tokens), losses._next_token_terms(logits, tokens)[1],
            losses.token_entropy(logits[:, :-1]))


# Tolerance: per position, the chunked and whole paths run the same f32 ops on the same
# [E] x [E, V] products (E = 16) and the same V = 50 term reductions; only XLA's fusion and
# the matmul's blocking may order a sum differently. |logits| <= ~30, so a log-sum-exp
# differs by at most ~(E + V) * eps32 * 30 ~ 2e-4 in the worst case; gradients are sums of
# T * B = 111 such per-position terms of size ~|hidden| ~ 3.
ATOL, GRAD_ATOL = 2e-4, 1e-3


# 37 positions: chunks that divide (37: one chunk, the whole path) and that leave a padded tail
@pytest.mark.parametrize("chunk, temperature", [(5, 1.0), (8, 0.7), (36, 0.7), (37, 1.0)])
def test_chunked_terms_equal_the_whole_logits_values_and_gradients(chunk, temperature):
    hidden, weights, tokens = _problem()
    terms = losses.chunked_next_token_terms(hidden, lambda h: h @ weights, tokens, chunk, temperature, True)
    logprobs, is_top, entropy = _whole(hidden, weights, tokens, temperature)
    np.testing.assert_allclose(terms.logprobs, logprobs, atol=ATOL, rtol=0)
    np.testing.assert_allclose(terms.entropy, entropy, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(terms.is_top, is_top)
    mask = (jnp.arange(T)[None] % 3 != 0).astype(jnp.float32) * jnp.ones((B, 1))

    def chunked_loss(h, w):
        got = losses.chunked_next_token_terms(h, lambda x: x @ w, tokens, chunk, temperature, True)
        return losses.sft_loss_from_terms(got.logprobs, got.is_top, mask)[0] + jnp.mean(got.entropy)

    def whole_loss(h, w):
        logits = (h @ w) / temperature
        return losses.sft_loss(logits, tokens, mask)[0] + jnp.mean(losses.token_entropy(logits[:, :-1]))

    np.testing.assert_allclose(chunked_loss(hidden, weights), whole_loss(hidden, weights), atol=ATOL, rtol=0)
    for got, want in zip(jax.grad(chunked_loss, (0, 1))(hidden, weights), jax.grad(whole_loss, (0, 1))(hidden, weights)):
        np.testing.assert_allclose(got, want, atol=GRAD_ATOL, rtol=0)


def test_a_compiled_chunked_loss_holds_one_chunk_of_logits_not_all():
    """Value and gradient of the SFT loss at [4, 1024] tokens over V = 32768: all the f32
    logits are 512 MiB, a chunk of 32 positions 16 MiB. The compiled program's temporaries
    stay within a few chunks (logits, their softmax and gradient, the weight's gradient);
    the whole-logits program needs several times the full logits."""
    b, t, e, v, chunk = 4, 1024, 64, 32768, 32
    args = (jax.ShapeDtypeStruct((b, t, e), jnp.float32), jax.ShapeDtypeStruct((e, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))

    def chunked(h, w, tokens):
        got = losses.chunked_next_token_terms(h, lambda x: x @ w, tokens, chunk)
        return losses.sft_loss_from_terms(got.logprobs, got.is_top, jnp.ones((b, t)))[0]

    def whole(h, w, tokens):
        return losses.sft_loss(h @ w, tokens, jnp.ones((b, t)))[0]

    temp = lambda f: jax.jit(jax.grad(f, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    full_logits, chunk_logits = b * t * v * 4, b * chunk * v * 4
    assert temp(chunked) < 4 * chunk_logits <= full_logits / 8
    assert temp(whole) > full_logits


def test_the_chunk_follows_the_per_device_budget(eight_devices):
    cfg = dataclasses.replace(TINY_MODEL, vocab_size=1000, logits_chunk_bytes=1000 * 4 * 10)  # 10 rows x 1 position
    assert lm_terms.logits_chunk(cfg, rows=5, length=64) == 2  # no mesh: 5 rows, 2 positions a chunk
    assert lm_terms.logits_chunk(cfg, rows=5, length=5) == 2  # 3 chunks: 2, 2 and 1 (+ 1 padded)
    assert lm_terms.logits_chunk(cfg, rows=2, length=5) == 5  # all fit: one chunk, the unchunked path
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # 4 batch shards, vocabulary in 2
    with sharding.activate(mesh):
        assert lm_terms.logits_chunk(cfg, rows=16, length=5) == 5  # 4 rows x 500 ids: 5 positions fit
        assert lm_terms.logits_chunk(cfg, rows=16, length=7) == 4  # 2 chunks: 4 and 3 (+ 1 padded)
        assert lm_terms.logits_chunk(cfg, rows=40, length=64) == 2  # 10 rows x 500: 2 positions


def _batch(rows=8, length=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY_MODEL.vocab_size, (rows, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, rows)
    segments = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    positions = np.where(segments > 0, np.arange(length)[None], 0).astype(np.int32)
    loss_mask = (segments * (np.arange(length)[None] >= 4)).astype(np.float32)
    return TokenBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(loss_mask),
                      segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions))


def test_sft_and_eval_steps_give_the_same_numbers_in_chunks_as_whole(eight_devices):
    """A budget of 4 positions of one row's logits per device (8 rows on 8 devices) cuts each
    pass into 8 chunks; the SFT step's loss, metrics and gradients (one SGD step of rate 1:
    params - grads), and the eval step's sums, equal the one-chunk ones."""
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    batch = _batch()
    results = []
    for budget in (TINY_MODEL.logits_chunk_bytes, TINY_MODEL.vocab_size * 4 * 4):
        model = LanguageModel(dataclasses.replace(TINY_MODEL, logits_chunk_bytes=budget))
        tx = optax.sgd(1.0)
        state, shardings = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
        evaluate = steps.make_lm_eval_step(model, mesh, shardings.params, right_padded=True)
        sums = evaluate(state.params, batch)
        state, metrics = steps.make_sft_step(model, tx, mesh, shardings, right_padded=True)(state, batch)
        results.append((sums, metrics, state.params))
    (sums_a, metrics_a, params_a), (sums_b, metrics_b, params_b) = results
    # f32 sums of 8 x 31 token NLLs ~ 5 each: ~250 * 5 * eps32 ~ 2e-4 of reordering at most
    np.testing.assert_allclose(sums_a[0], sums_b[0], rtol=1e-6, atol=2e-4)
    assert float(sums_a[1]) == float(sums_b[1])
    for key in ("train/loss", "sft/accuracy", "optim/grad_norm"):
        np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # gradients of a mean over ~200 targets: entries ~1e-2, each a sum of ~200 f32 terms
    # whose order may differ: ~200 * eps32 * 1e-2 ~ 3e-7
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params_a, params_b)
