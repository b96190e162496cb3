"""ModelConfig.scan_layers: blocks under nn.scan with params stacked on a "layers" axis
compute what the unrolled blocks compute, on every path (forward, gradients, KV-cache
decoding, sampler, scalar heads, sharded meshes, exports)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, parameters, sharding
from rlhf_jax.config import ConfigError, MeshConfig, ModelConfig, SamplingConfig
from rlhf_jax.config.model import SCAN_LAYERS_FROM
from rlhf_jax.models import (KVCache, LanguageModel, ScalarModel, is_stacked, stack_layers,
                             unstack_layers)
from rlhf_jax.sampling import sample
from rlhf_jax.parameters import abstract as abstract_params
from tests.helpers import assert_f32_close, forward_sums

GPT2 = ModelConfig(family="gpt2", vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_len=32)
LLAMA = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                    d_ff=48, max_len=32, tie_embeddings=False)
CASES = {"gpt2": GPT2, "llama-gqa": LLAMA}


def _scanned(cfg, **kw):
    return dataclasses.replace(cfg, scan_layers=True, **kw)


def _init(cfg, model_cls=LanguageModel):
    model = model_cls(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, sharding.strip_boxes(params)


def _tokens(batch=3, t=12, vocab=64):
    return jax.random.randint(jax.random.key(1), (batch, t), 1, vocab)


def test_auto_scans_deep_models_and_stacked_tree_matches_stacking():
    assert ModelConfig().scan_layers == "auto" and ModelConfig().remat is False
    assert not ModelConfig(n_layers=SCAN_LAYERS_FROM - 1).stacked and ModelConfig(n_layers=SCAN_LAYERS_FROM).stacked
    assert not ModelConfig(n_layers=64, scan_layers=False).stacked and ModelConfig(n_layers=1, scan_layers=True).stacked
    assert not LLAMA.stacked  # 3 layers: unrolled by default
    _, unrolled = _init(LLAMA)
    _, scanned = _init(_scanned(LLAMA))
    assert is_stacked(unrolled) is False and is_stacked(scanned) is True
    assert "layers_0" in unrolled["backbone"] and "layers" in scanned["backbone"]
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(stack_layers(unrolled)) == shapes(scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stack_layers(unrolled), 3), unrolled)
    # the stacked axis carries the "layers" logical name (mapped by sharding.LOGICAL_AXIS_RULES)
    boxed = jax.eval_shape(lambda: LanguageModel(_scanned(LLAMA)).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    names = boxed["backbone"]["layers"]["attn"]["query"]["kernel"].names
    assert names == ("layers", "embed", "heads", "kv")


@pytest.mark.parametrize("case", CASES)
def test_stacked_forward_equals_unrolled(case):
    cfg = CASES[case]
    model, params = _init(cfg)
    scanned_model = LanguageModel(_scanned(cfg))
    tokens = _tokens()
    segments = jnp.ones_like(tokens).at[1, 8:].set(0)
    want, _ = jax.jit(model.apply)({"params": params}, tokens, segment_ids=segments)
    got, _ = jax.jit(scanned_model.apply)({"params": stack_layers(params)}, tokens, segment_ids=segments)
    assert_f32_close(got, want, forward_sums(cfg, 12))  # XLA may fuse, so add up, a scan's body otherwise


def test_scalar_head_on_stacked_params_equals_unrolled():
    model, params = _init(LLAMA, ScalarModel)
    tokens = _tokens()
    want, _ = model.apply({"params": params}, tokens)
    got, _ = ScalarModel(_scanned(LLAMA)).apply({"params": stack_layers(params)}, tokens)
    assert_f32_close(got, want, forward_sums(LLAMA, 12))


@pytest.mark.parametrize("remat", [False, "full", "dots_saveable"])
def test_stacked_gradients_equal_unrolled(remat):
    model, params = _init(LLAMA)
    scanned_model = LanguageModel(_scanned(LLAMA, remat=remat))
    tokens = _tokens()

    def loss(m, p):
        logits, _ = m.apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    want = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    got = jax.jit(jax.grad(lambda p: loss(scanned_model, p)))(stack_layers(params))
    # backward: the forward sums twice, the softmax over the vocabulary and the mean over 3 x 12
    # positions, at the scale of the largest gradient (tests.helpers.f32_rtol)
    sums = [*forward_sums(LLAMA, 12), *forward_sums(LLAMA, 12), LLAMA.vocab_size, 3 * 12]
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want))
    jax.tree.map(lambda a, b: assert_f32_close(a, b, sums, scale=scale), got, stack_layers(want))


def test_stacked_dropout_trains_with_different_masks_per_layer():
    model, params = _init(_scanned(LLAMA), functools.partial(LanguageModel, dropout_rate=0.5))
    tokens = _tokens()
    a, _ = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    b, _ = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    c, _ = model.apply({"params": params}, tokens, deterministic=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bad_remat_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.remat must be one of"):
        dataclasses.replace(LLAMA, remat="everything").validate()


@pytest.mark.parametrize("case", CASES)
def test_stacked_kv_cache_decoding_equals_unrolled_and_full_pass(case):
    cfg = CASES[case]
    model, params = _init(cfg)
    scanned_model, stacked = LanguageModel(_scanned(cfg)), stack_layers(params)
    tokens = _tokens()
    full, _ = model.apply({"params": params}, tokens)
    for m, p in ((model, params), (scanned_model, stacked)):
        cache = KVCache.init(m.cfg, batch=3, slots=16)
        logits, cache = m.apply({"params": p}, tokens[:, :5], cache=cache)
        steps = [logits]
        for t in range(5, 12):
            logits, cache = m.apply({"params": p}, tokens[:, t:t + 1], positions=jnp.full((3, 1), t), cache=cache)
            steps.append(logits)
        # decoding attends over the cache's 16 slots (the empty ones masked) instead of 12 positions
        assert_f32_close(jnp.concatenate(steps, axis=1), full, forward_sums(cfg, 16))
        assert cache.keys.shape[0] == cfg.n_layers


@pytest.mark.parametrize("case", CASES)
def test_greedy_sampling_equal_stacked_and_unrolled(case):
    cfg = CASES[case]
    model, params = _init(cfg)
    prompts = _tokens(batch=2, t=6)
    segments = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]])
    scfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    run = lambda m, p: jax.jit(lambda p: sample(m, p, prompts * segments, segments, jax.random.key(0),  # noqa: E731
                                                scfg, eos_id=-1, pad_id=0))(p)
    want, got = run(model, params), run(LanguageModel(_scanned(cfg)), stack_layers(params))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    # a log-softmax over the vocabulary after the forward pass over the 14 cache slots
    assert_f32_close(got.logprobs, want.logprobs, [*forward_sums(cfg, 14), cfg.vocab_size])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)],
                         ids=["data", "fsdp", "tensor", "2x2x2"])
def test_sharded_stacked_forward_equals_one_device(mesh_shape, eight_devices):
    cfg = dataclasses.replace(_scanned(LLAMA), d_model=64, n_heads=8, n_kv_heads=8, d_ff=64)
    model = LanguageModel(cfg)
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), eight_devices)
    params, shardings = parameters.create(model, mesh, jax.random.key(0))
    kernel = params["backbone"]["layers"]["attn"]["query"]["kernel"]
    assert kernel.shape[0] == cfg.n_layers and kernel.sharding.spec[0] is None  # layers unsharded
    tokens = _tokens(batch=8)
    with sharding.activate(mesh):
        got, _ = jax.jit(model.apply)({"params": params}, tokens)
        cache = KVCache.init(cfg, batch=8, slots=16)
        got_step, _ = jax.jit(model.apply)({"params": params}, tokens, cache=cache)
    single = jax.device_put(params, jax.devices()[0])
    want, _ = jax.jit(model.apply)({"params": single}, tokens)
    assert_f32_close(got, want, forward_sums(cfg, 12))  # the mesh splits sums (heads, d_ff) across devices
    assert_f32_close(got_step, want, forward_sums(cfg, 16))  # the cache path attends over 16 slots


@pytest.mark.parametrize("saved_scan", [False, True], ids=["unrolled-export", "stacked-export"])
def test_export_converts_between_stacked_and_unrolled(saved_scan, tmp_path, eight_devices):
    _, params = _init(LLAMA)
    saved_cfg = dataclasses.replace(LLAMA, scan_layers=saved_scan)
    checkpoint.export_params(tmp_path / "export", stack_layers(params) if saved_scan else params, saved_cfg)
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2), eight_devices)
    for want_scan in (False, True):
        cfg = dataclasses.replace(LLAMA, scan_layers=want_scan)
        target = abstract_params(LanguageModel(cfg), mesh)
        loaded = checkpoint.load_export(tmp_path / "export", target, cfg)
        expect = stack_layers(params) if want_scan else params
        jax.tree.map(np.testing.assert_array_equal, loaded, expect)
        jax.tree.map(lambda x, t: x.sharding.is_equivalent_to(t.sharding, x.ndim) or pytest.fail("sharding"),
                     loaded, target)
    # a target whose layout contradicts the config is refused, naming the field
    target = abstract_params(LanguageModel(dataclasses.replace(LLAMA, scan_layers=True)), mesh)
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.scan_layers=False"):
        checkpoint.load_export(tmp_path / "export", target, dataclasses.replace(LLAMA, scan_layers=False))
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.scan_layers='auto' \(3 layers\)"):
        checkpoint.load_export(tmp_path / "export", target, LLAMA)  # "auto" on 3 layers: unrolled


def test_export_from_before_scan_layers_still_loads(tmp_path):
    """An export.json written before the field existed has no scan_layers: unrolled, even
    where "auto" (today's default) would stack that depth."""
    import json

    deep = dataclasses.replace(LLAMA, n_layers=SCAN_LAYERS_FROM, scan_layers=False)
    _, params = _init(deep)
    checkpoint.export_params(tmp_path / "export", params, deep)
    meta_path = tmp_path / "export" / checkpoint.EXPORT_META
    meta = json.loads(meta_path.read_text())
    del meta["model"]["scan_layers"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "export" / checkpoint.CHECKSUMS).unlink()  # nor had exports checksums then
    assert checkpoint.export_model_config(tmp_path / "export").stacked is False
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    for cfg in (deep, dataclasses.replace(deep, scan_layers="auto")):
        loaded = checkpoint.load_export(tmp_path / "export", abstract_params(LanguageModel(cfg), mesh), cfg)
        assert is_stacked(loaded) is cfg.stacked
        want = stack_layers(params) if cfg.stacked else params
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, loaded)


def test_sft_resume_on_stacked_params_is_exact(tmp_path):
    """Stopped at step 4 and resumed (from the Orbax checkpoint of a stacked TrainState), the
    SFT stage ends with the params of an uninterrupted run; the export records scan_layers."""
    import json

    from rlhf_jax.stages.sft import run_sft
    from tests.helpers import TINY_MODEL, tiny_config, write_demonstrations

    demos = write_demonstrations(tmp_path / "demos.jsonl", 64)
    model = dataclasses.replace(TINY_MODEL, scan_layers=True, remat="dots_saveable")
    cfg = tiny_config(demos, steps=8, save_every=2, dropout=0.1, model=model)
    straight = run_sft(cfg, tmp_path / "straight", show_progress=False)
    assert run_sft(cfg, tmp_path / "resumed", show_progress=False, stop_after=4) is None
    resumed = run_sft(cfg, tmp_path / "resumed", show_progress=False)
    assert json.loads((resumed / checkpoint.EXPORT_META).read_text())["model"]["scan_layers"] is True
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    target = abstract_params(LanguageModel(model), mesh)
    a, b = checkpoint.load_export(straight, target, model), checkpoint.load_export(resumed, target, model)
    assert is_stacked(a)
    jax.tree.map(np.testing.assert_array_equal, a, b)
