"""The decoder: KV-cache decoding equals the full pass, masks, parameter counts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import KVCache, LanguageModel, ScalarModel, positions_from_segments
from tests.helpers import assert_f32_close, forward_sums

GPT2 = ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=32)
LLAMA_GQA = ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=48, max_len=32, tie_embeddings=False)


def _init(cfg, model_cls=LanguageModel):
    model = model_cls(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


@pytest.mark.parametrize("cfg", [GPT2, LLAMA_GQA, dataclasses.replace(LLAMA_GQA, n_kv_heads=1, qkv_bias=True)],
                         ids=["gpt2", "llama-gqa", "llama-mqa-bias"])
def test_incremental_decoding_matches_full_forward(cfg):
    model, params = _init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
    full, _ = model.apply({"params": params}, tokens)

    cache = KVCache.init(cfg, batch=3, slots=16)
    logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)  # prefill
    steps = [logits]
    for t in range(5, 12):
        logits, cache = model.apply({"params": params}, tokens[:, t:t + 1],
                                    positions=jnp.full((3, 1), t), cache=cache)
        steps.append(logits)
    # decoding attends over the cache's 16 slots (empty ones masked) instead of 12 positions
    assert_f32_close(jnp.concatenate(steps, axis=1), full, forward_sums(cfg, 16))
    assert int(cache.index) == 12


@pytest.mark.parametrize("cfg", [GPT2, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
def test_left_padded_prefill_matches_unpadded(cfg):
    """A prompt left-padded in the cache gives the same next-token logits as alone."""
    model, params = _init(cfg)
    prompt = jnp.array([[5, 9, 13, 2]])
    alone, _ = model.apply({"params": params}, prompt)

    padded = jnp.array([[0, 0, 0, 5, 9, 13, 2]])
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    cache = KVCache.init(cfg, batch=1, slots=8)
    logits, cache = model.apply({"params": params}, padded, positions_from_segments(segments), segments,
                                cache=cache)
    assert_f32_close(logits[:, -1], alone[:, -1], forward_sums(cfg, 8))  # 8 cache slots, 3 masked
    # and one decode step after it equals the full pass on the 5-token sequence
    nxt = jnp.array([[7]])
    step_logits, _ = model.apply({"params": params}, nxt, jnp.array([[4]]), cache=cache)
    full, _ = model.apply({"params": params}, jnp.array([[5, 9, 13, 2, 7]]))
    assert_f32_close(step_logits[:, 0], full[:, -1], forward_sums(cfg, 8))


def test_packed_segments_do_not_see_each_other():
    model, params = _init(LLAMA_GQA)
    a, b = jnp.array([[3, 4, 5]]), jnp.array([[6, 7]])
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    logits, _ = model.apply({"params": params}, packed, positions_from_segments(segments), segments)
    alone_a, _ = model.apply({"params": params}, a)
    alone_b, _ = model.apply({"params": params}, b)
    assert_f32_close(logits[:, :3], alone_a, forward_sums(LLAMA_GQA, 7))  # 7 positions, the others masked
    assert_f32_close(logits[:, 3:5], alone_b, forward_sums(LLAMA_GQA, 7))


@pytest.mark.parametrize("cfg", [GPT2, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
def test_chunked_attention_matches_dot_product_attention(cfg):
    """The CPU path (query chunks of 64, blocks above the diagonal skipped) gives the same
    logits and gradients as jax.nn.dot_product_attention, across chunk boundaries, with
    packed segments and padding, and a length that is not a multiple of the chunk."""
    cfg = dataclasses.replace(cfg, max_len=160)
    t = 150  # chunks [0, 64), [64, 128), [128, 150)
    segments = np.zeros((2, t), np.int32)
    segments[0, :90], segments[0, 90:140] = 1, 2  # two packed examples, then padding
    segments[1, :] = 1
    segments = jnp.asarray(segments)
    tokens = jax.random.randint(jax.random.key(2), (2, t), 1, cfg.vocab_size) * (segments > 0)
    positions = positions_from_segments(segments)
    real = (segments > 0)[..., None]

    def loss_and_logits(impl):
        model = LanguageModel(dataclasses.replace(cfg, attention_impl=impl))
        params = _init(cfg)[1]

        def loss(p):
            logits, _ = model.apply({"params": p}, tokens, positions, segments)
            return jnp.sum(jnp.where(real, logits, 0.0) ** 2), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return jnp.where(real, logits, 0.0), grads

    chunked_logits, chunked_grads = loss_and_logits("chunked")
    xla_logits, xla_grads = loss_and_logits("xla")
    # blocks of 64 queries add up the softmax and weighted values in other orders; the loss sums
    # the squared logits of the real positions, the gradients the backward pass's sums over
    # them, at the scale of the largest gradient (tests.helpers.f32_rtol)
    forward = forward_sums(cfg, t)
    assert_f32_close(chunked_logits, xla_logits, forward)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(xla_grads))
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(chunked_grads),
                            zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(xla_grads))):
        assert_f32_close(a, b, [*forward, *forward, 2 * t], scale=scale, err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.parametrize("cfg", [GPT2, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
def test_logits_from_computes_only_the_later_positions(cfg):
    model, params = _init(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
    full, _ = model.apply({"params": params}, tokens)
    tail, _ = model.apply({"params": params}, tokens, logits_from=6)
    assert tail.shape == (2, 4, cfg.vocab_size)
    assert_f32_close(tail, full[:, 6:], forward_sums(cfg, 10))  # other shapes: XLA may add up otherwise


def test_positions_from_segments():
    segments = jnp.array([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1]])
    # restart at each segment start; padding gets 0
    expected = np.array([[0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(positions_from_segments(segments), expected)


def _expected_param_count(cfg: ModelConfig) -> int:
    d, f, v, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    q = cfg.n_heads * cfg.dim_per_head
    kv = cfg.kv_heads * cfg.dim_per_head
    if cfg.family == "gpt2":
        # q,k,v,o kernels + biases; fc_in/fc_out kernels + biases; two LayerNorms (scale+bias)
        per_layer = d * (q + 2 * kv) + (q + 2 * kv) + q * d + d + 2 * d * f + f + d + 4 * d
        total = v * d + cfg.max_len * d + L * per_layer + 2 * d
    else:
        bias = (q + 2 * kv) if cfg.qkv_bias else 0
        # q,k,v,o kernels (+ qkv biases); gate/up/down; two RMSNorm scales
        per_layer = d * (q + 2 * kv) + bias + q * d + 3 * d * f + 2 * d
        total = v * d + L * per_layer + d
    if not cfg.tie_embeddings:
        total += d * v
    return total


@pytest.mark.parametrize("cfg", [GPT2, LLAMA_GQA, dataclasses.replace(LLAMA_GQA, qkv_bias=True, tie_embeddings=True),
                                 dataclasses.replace(GPT2, tie_embeddings=False)],
                         ids=["gpt2", "llama-gqa", "llama-tied-bias", "gpt2-untied"])
def test_parameter_count_matches_formula(cfg):
    _, params = _init(cfg)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == _expected_param_count(cfg)


def test_scalar_model_shares_backbone_with_language_model():
    _, lm_params = _init(LLAMA_GQA)
    model, sc_params = _init(LLAMA_GQA, ScalarModel)
    assert jax.tree.structure(lm_params["backbone"]) == jax.tree.structure(sc_params["backbone"])
    values, _ = model.apply({"params": sc_params}, jnp.ones((2, 5), jnp.int32))
    assert values.shape == (2, 5) and values.dtype == jnp.float32


def test_bf16_compute_keeps_f32_params_and_logits():
    cfg = dataclasses.replace(LLAMA_GQA, compute_dtype="bfloat16")
    model, params = _init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _ = model.apply({"params": params}, jnp.ones((1, 3), jnp.int32))
    f32_logits, _ = LanguageModel(LLAMA_GQA).apply({"params": params}, jnp.ones((1, 3), jnp.int32))
    assert logits.dtype == jnp.float32
    # bf16 rounding only: every matmul input is rounded to bfloat16 (eps 2**-7 between two
    # products' inputs) and accumulated in f32; 9 roundings a layer (q, k, v, scores,
    # probabilities, output projection, the MLP's three) and the head's, relative to the logits
    casts = 9 * cfg.n_layers + 1
    np.testing.assert_allclose(logits, f32_logits, rtol=0, atol=casts * 2.0 ** -7 * float(jnp.max(jnp.abs(f32_logits))))


def test_remat_gives_the_same_gradients():
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 61)
    model, params = _init(LLAMA_GQA)
    remat_model = LanguageModel(dataclasses.replace(LLAMA_GQA, remat=True))

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, tokens)[0] ** 2)

    g1 = jax.grad(lambda p: loss(model, p))(params)
    g2 = jax.grad(lambda p: loss(remat_model, p))(params)
    # recomputing the forward pass in the backward may fuse, so add up, differently; the loss
    # is a mean over 2 x 8 x 61 logits (tests.helpers.f32_rtol), at the largest gradient's scale
    forward = forward_sums(LLAMA_GQA, 8)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert_f32_close(a, b, [*forward, *forward, 2 * 8 * 61], scale=scale)


def test_dropout_is_active_only_when_training():
    model, params = _init(GPT2, functools.partial(LanguageModel, dropout_rate=0.5))
    tokens = jnp.ones((2, 6), jnp.int32)
    eval_a, _ = model.apply({"params": params}, tokens)
    eval_b, _ = model.apply({"params": params}, tokens)
    train, _ = model.apply({"params": params}, tokens, deterministic=False,
                           rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train, eval_a)
