"""The sampler: greedy == full-forward argmax, log-probs == recomputed, EOS, filters, no recompiles,
padded vocabulary ids never drawn."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, sharding
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.models import LanguageModel, vocab
from rlhf_jax import sampling
from rlhf_jax.config import SamplingConfig
from rlhf_jax.sampling import filter_logits, make_sampler
from tests.helpers import assert_f32_close, f32_rtol, forward_sums

CFG = ModelConfig(family="llama", vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=64, max_len=64, tie_embeddings=False)
EOS, PAD = 1, 0
# a forward pass over up to 16 positions (prompt and response), then a log-softmax over the words
SUMS = [*forward_sums(CFG, 16), CFG.vocab_size]
# The traceable sampler, jitted (model, config and special ids are static).
sample = jax.jit(sampling.sample, static_argnums=(0, 5, 6, 7))


def _prompts():
    # two left-padded prompts of lengths 3 and 5
    tokens = jnp.array([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]])
    segments = (jnp.arange(5)[None, :] >= jnp.array([[2], [0]])).astype(jnp.int32)
    return tokens, segments


def _model():
    model = LanguageModel(CFG)
    # Scaled up so greedy choices are not near-ties.
    params = jax.jit(lambda key: jax.tree.map(lambda x: x * 3, model.init(key, jnp.zeros((1, 4), jnp.int32))["params"]))(
        jax.random.key(0))
    return model, params


def test_greedy_sampling_equals_full_forward_argmax_and_logprobs_match():
    model, params = _model()
    tokens, segments = _prompts()
    out = sample(model, params, tokens, segments, jax.random.key(1),
                 SamplingConfig(max_new_tokens=8, temperature=0.0), eos_id=-1, pad_id=PAD)
    # Reference: re-run the full forward pass on the growing sequence (right-padded to a
    # fixed length so one compiled function serves every step) and take the argmax.
    forward = jax.jit(lambda seq, segs: model.apply({"params": params}, seq, None, segs)[0])
    for row in range(2):
        seq = [int(t) for t, s in zip(tokens[row], segments[row]) if s]
        for step in range(8):
            padded = jnp.array([seq + [PAD] * (16 - len(seq))])
            logits = forward(padded, (jnp.arange(16) < len(seq)).astype(jnp.int32)[None])[0, len(seq) - 1]
            expected = int(jnp.argmax(logits))
            assert int(out.tokens[row, step]) == expected, (row, step)
            # the sampler decodes over its cache, the reference passes over 16 positions; then a
            # log-softmax over 40 words (tests.helpers.f32_rtol), at this log-probability's scale
            assert_f32_close(out.logprobs[row, step], jax.nn.log_softmax(logits)[expected], SUMS, ops=3,
                             scale=float(jnp.max(jnp.abs(jax.nn.log_softmax(logits)))))
            seq.append(expected)
    assert out.mask.all() and not out.ended.any()
    # log-probs recomputed from one forward pass over prompt + response
    full, segs, pos = out.full_sequences()
    logits, _ = model.apply({"params": params}, full, pos, segs)
    recomputed = losses.next_token_logprobs(logits, full)[:, tokens.shape[1] - 1:]
    assert_f32_close(recomputed, out.logprobs, SUMS, ops=3)


def test_sampled_logprobs_match_a_forward_pass_at_temperature():
    model, params = _model()
    tokens, segments = _prompts()
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.7)
    out = sample(model, params, tokens, segments, jax.random.key(2), cfg, eos_id=-1, pad_id=PAD)
    full, segs, pos = out.full_sequences()
    logits, _ = model.apply({"params": params}, full, pos, segs)
    recomputed = losses.next_token_logprobs(logits / 0.7, full)[:, tokens.shape[1] - 1:]
    assert_f32_close(recomputed, out.logprobs, SUMS, ops=4)  # and the division by the temperature


def test_rows_stop_at_eos_and_the_loop_exits_early():
    model, params = _model()
    tokens, segments = _prompts()
    greedy = sample(model, params, tokens, segments, jax.random.key(1),
                    SamplingConfig(max_new_tokens=8, temperature=0.0), eos_id=-1, pad_id=PAD)
    eos = int(greedy.tokens[0, 2])  # pretend row 0's third token is EOS
    out = sample(model, params, tokens, segments, jax.random.key(1),
                 SamplingConfig(max_new_tokens=8, temperature=0.0), eos_id=eos, pad_id=PAD)
    first = [int(np.argmax(np.asarray(r) == eos)) if (np.asarray(r) == eos).any() else 8 for r in greedy.tokens]
    for row in range(2):
        n = min(first[row] + 1, 8)
        assert out.mask[row].sum() == n
        np.testing.assert_array_equal(out.tokens[row, :n], greedy.tokens[row, :n])
        assert (out.tokens[row, n:] == PAD).all() and (out.logprobs[row, n:] == 0).all()
    assert bool(out.ended[0])


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 alone is < 0.7, so 0.3 is also kept; 0.15 starts beyond it
    assert np.isfinite(filter_logits(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert np.isfinite(filter_logits(logits, 0, 0.1)).tolist() == [[True, False, False, False]]
    samples = jax.vmap(lambda k: jax.random.categorical(k, filter_logits(logits, 0, 0.7)[0]))(
        jax.random.split(jax.random.key(0), 2000))
    assert set(np.unique(samples).tolist()) == {0, 1}


def test_sharded_sampler_matches_and_never_recompiles(eight_devices):
    model, params = _model()
    tokens, segments = _prompts()
    tokens, segments = jnp.tile(tokens, (4, 1)), jnp.tile(segments, (4, 1))  # batch 8 over 8 devices
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=10)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = sharding.logical_shardings(
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((4, 1), jnp.int32))["params"]), mesh)
    sharded_params = jax.device_put(params, shardings)
    sampler = make_sampler(model, cfg, mesh, shardings, eos_id=EOS, pad_id=PAD)
    out = sampler(sharded_params, tokens, segments, jax.random.key(3))
    reference = sample(model, params, tokens, segments, jax.random.key(3), cfg, EOS, PAD)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    assert_f32_close(out.logprobs, reference.logprobs, SUMS, ops=3)  # the mesh splits heads, d_ff, words
    sampler(sharded_params, tokens, segments, jax.random.key(4))
    assert sampler.jitted._cache_size() == 1


class _CountingLM(LanguageModel):
    """Counts (on the host, at run time) the one-token decode forwards the sampler makes."""

    def __call__(self, tokens, *args, **kwargs):
        if kwargs.get("cache") is not None and tokens.shape[1] == 1:
            jax.debug.callback(lambda: DECODE_FORWARDS.append(1))
        return super().__call__(tokens, *args, **kwargs)


DECODE_FORWARDS: list[int] = []


def test_n_new_tokens_take_n_minus_one_decode_forwards_and_none_after_every_row_ends():
    _, params = _model()
    tokens, segments = _prompts()
    model = _CountingLM(CFG)
    for n in (1, 2, 6):
        DECODE_FORWARDS.clear()
        out = sample(model, params, tokens, segments, jax.random.key(1),
                     SamplingConfig(max_new_tokens=n, temperature=0.0), eos_id=-1, pad_id=PAD)
        jax.block_until_ready(out.tokens)
        jax.effects_barrier()
        # the prefill's logits give token 0; each decode forward reads the token just chosen
        assert (len(DECODE_FORWARDS), int(out.mask.sum())) == (n - 1, 2 * n)
    # two copies of one prompt choose the same first token; made the EOS, it ends both rows
    # there, and no decode forward runs at all
    same_tokens, same_segments = jnp.stack([tokens[1]] * 2), jnp.stack([segments[1]] * 2)
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    first = int(sample(model, params, same_tokens, same_segments, jax.random.key(1), config, eos_id=-1,
                       pad_id=PAD).tokens[0, 0])
    DECODE_FORWARDS.clear()
    out = sample(model, params, same_tokens, same_segments, jax.random.key(1), config, eos_id=first, pad_id=PAD)
    jax.effects_barrier()
    assert len(DECODE_FORWARDS) == 0 and bool(out.ended.all()) and int(out.mask.sum()) == 2


def test_zero_new_tokens_is_refused_naming_the_field():
    model, params = _model()
    tokens, segments = _prompts()
    with pytest.raises(ValueError, match="sampling.max_new_tokens must be >= 1, got 0"):
        sample(model, params, tokens, segments, jax.random.key(1), SamplingConfig(max_new_tokens=0), eos_id=EOS,
               pad_id=PAD)


def test_padded_vocabulary_ids_are_never_sampled_and_have_zero_probability():
    """model.vocab_pad_multiple: 37 real ids padded to 40. The padded columns of the head are
    made huge, so unmasked they would take nearly all the probability; masked, they get
    exactly 0 and are never drawn, whatever the temperature or filter."""
    cfg = dataclasses.replace(CFG, vocab_size=37, vocab_pad_multiple=8)
    model = LanguageModel(cfg)
    params = sharding.strip_boxes(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    assert params["lm_head"]["kernel"].shape == (32, 40)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 37:].set(50.0)
    tokens, segments = _prompts()
    tokens, segments = jnp.tile(tokens, (16, 1)), jnp.tile(segments, (16, 1))  # 32 rows
    for sampling_cfg in (SamplingConfig(max_new_tokens=8, temperature=0.0),
                         SamplingConfig(max_new_tokens=8, temperature=3.0),
                         SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=39, top_p=0.999)):
        out = sample(model, params, tokens, segments, jax.random.key(5), sampling_cfg, eos_id=-1, pad_id=PAD)
        assert int(out.tokens.max()) < 37, sampling_cfg
        assert np.isfinite(np.asarray(out.logprobs)).all()

    full, segs, pos = out.full_sequences()
    logits, _ = model.apply({"params": params}, full, pos, segs)
    assert logits.shape[-1] == 40
    probs = jax.nn.softmax(logits / 0.7, axis=-1)
    assert (probs[..., 37:] == 0).all()
    np.testing.assert_allclose(probs[..., :37].sum(-1), 1.0, atol=f32_rtol(40, 37, ops=3))  # softmax, then sum
    # entropy (over the full, padded width, at a temperature) equals that of the real ids
    mask = jnp.ones(logits.shape[:2])
    padded_entropy, _ = losses.entropy(logits / 0.7, mask)
    real_entropy, _ = losses.entropy(logits[..., :37] / 0.7, mask)
    assert np.isfinite(float(padded_entropy))
    # the masked ids' exp is exactly 0, but a sum over 40 words may add up otherwise than over 37;
    # then the mean over the positions (tests.helpers.f32_rtol)
    np.testing.assert_allclose(padded_entropy, real_entropy, rtol=f32_rtol(40, 40, int(mask.size), ops=3))
    np.testing.assert_array_equal(np.asarray(logits[..., 37:]), vocab.MASKED_LOGIT)
