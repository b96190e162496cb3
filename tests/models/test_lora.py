"""LoRA on tiny models: names, zero-initialised adapters, adapters off, merging, dropout on
the adapter input, what trains, sharding, loading and exporting (ours and PEFT's).

Tolerance of merged vs unmerged (f32): ``x (W + s A B)`` and ``x W + s (x A) B`` differ by
rounding only; 2 layers x 7 matmuls of <= 64 terms on O(1) logits give
~sqrt(14 * 64) * 6e-8 ~ 2e-6, so ``1e-5``.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoint, parameters, sharding, steps
from rlhf_jax.config import ConfigError, LoRAConfig, MeshConfig, ModelConfig, apply_overrides
from rlhf_jax.config.lora import resolve_targets
from rlhf_jax.models import LanguageModel, ScalarModel, lora
from rlhf_jax.types import TokenBatch

LLAMA = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_len=32, tie_embeddings=False)
ADAPTERS = LoRAConfig(rank=4, alpha=6.0, target_modules=("all-linear",))
MERGE_TOL = 1e-5  # derived in the module docstring


def _logits(model, params, tokens, **kwargs):
    """``model``'s first output, jitted (op-by-op dispatch would compile every primitive)."""
    return jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs)[0])(params, tokens)


def _one_device():
    return sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)))


def _with_random_b(params, seed=3):
    """``params`` with every ``lora_b`` drawn away from zero (trained adapters, in effect)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * jax.random.normal(next(keys), x.shape) if path[-1].key == "lora_b" else x, params)


def _base_and_lora(stacked: bool, lora_cfg: LoRAConfig = ADAPTERS):
    cfg = dataclasses.replace(LLAMA, scan_layers=stacked)
    mesh = _one_device()
    base, _ = parameters.create(LanguageModel(cfg), mesh, jax.random.PRNGKey(0))
    model = LanguageModel(dataclasses.replace(cfg, lora=lora_cfg))
    return cfg, base, model, lora.merge(base, parameters.fresh_adapters(model, mesh, jax.random.PRNGKey(1)))


def test_target_names_map_onto_our_projections():
    assert resolve_targets(("q_proj", "v_proj", "down_proj"), "llama", "f") == {"query", "value", "fc_out"}
    assert resolve_targets(("all-linear",), "llama", "f") == {"query", "key", "value", "out", "gate", "up", "fc_out"}
    assert resolve_targets(("c_attn",), "gpt2", "f") == {"query", "key", "value"}
    assert resolve_targets(("c_proj", "c_fc"), "gpt2", "f") == {"out", "fc_out", "fc_in"}
    assert resolve_targets(("mlp.c_proj", "out"), "gpt2", "f") == {"fc_out", "out"}


@pytest.mark.parametrize("lora_cfg, message", [
    (LoRAConfig(rank=-1), "model.lora.rank must be >= 0"),
    (LoRAConfig(rank=8, alpha=0.0), "model.lora.alpha must be positive"),
    (LoRAConfig(rank=8, dropout=1.0), "model.lora.dropout must be in [0, 1)"),
    (LoRAConfig(rank=8, target_modules=("q_proj", "c_attn")), "model.lora.target_modules: 'c_attn' is not a "
                                                              "projection of a llama model"),
    (LoRAConfig(rank=8, target_modules=()), "model.lora.target_modules is empty"),
])
def test_bad_lora_fields_are_named(lora_cfg, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        dataclasses.replace(LLAMA, lora=lora_cfg).validate()


def test_lora_is_set_from_the_command_line():
    from rlhf_jax.default_config import default_config

    cfg = apply_overrides(default_config(), ["--model.lora.rank=8", "--model.lora.alpha=16",
                                             "--model.lora.target_modules", "q_proj", "v_proj"])
    assert cfg.model.lora == LoRAConfig(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    assert cfg.model.lora.targets(cfg.model.family) == {"query", "value"}


@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan_layers"])
def test_zero_adapters_change_nothing_and_merging_keeps_the_function(stacked):
    cfg, base, model, params = _base_and_lora(stacked)
    tokens = _tokens()
    base_logits = _logits(LanguageModel(cfg), base, tokens)
    shapes = jax.tree.map(jnp.shape, lora.adapter_params(params))["backbone"]
    layer = shapes["layers"] if stacked else shapes["layers_0"]
    lead = (2,) if stacked else ()
    assert layer["attn"]["key"] == {"lora_a": lead + (32, 4), "lora_b": lead + (4, 2, 8)}  # in -> r -> [K, D]
    assert layer["attn"]["out"] == {"lora_a": lead + (4, 8, 4), "lora_b": lead + (4, 32)}  # [H, D] -> r -> out
    # lora_b starts at zero: the adapters add exact zeros
    np.testing.assert_array_equal(_logits(model, params, tokens), base_logits)

    trained = _with_random_b(params)
    adapted = _logits(model, trained, tokens)
    assert float(jnp.abs(adapted - base_logits).max()) > 0.1
    # the base weights without the adapters, through the same model: the adapters are off
    np.testing.assert_array_equal(_logits(model, lora.base_params(trained), tokens), base_logits)
    merged = jax.jit(lambda p: lora.merge_adapters(p, ADAPTERS.scaling))(trained)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(_logits(LanguageModel(cfg), merged, tokens), adapted, atol=MERGE_TOL)


def test_scanned_adapters_compute_what_unrolled_ones_do():
    _, _, unrolled_model, params = _base_and_lora(False)
    trained = _with_random_b(params)
    scanned_model = LanguageModel(dataclasses.replace(unrolled_model.cfg, scan_layers=True))
    from rlhf_jax.models import stack_layers

    np.testing.assert_allclose(_logits(scanned_model, stack_layers(trained), _tokens()),
                               _logits(unrolled_model, trained, _tokens()), atol=MERGE_TOL)


def test_adapter_dropout_acts_on_the_adapter_input_only():
    _, _, model, params = _base_and_lora(False, dataclasses.replace(ADAPTERS, dropout=0.5))
    tokens, rngs = _tokens(), {"dropout": jax.random.PRNGKey(5)}
    for adapters, changes in ((params, False), (_with_random_b(params), True)):
        eval_logits = _logits(model, adapters, tokens)
        train_logits = _logits(model, adapters, tokens, deterministic=False, rngs=rngs)
        # residual dropout is 0: with lora_b zero nothing dropped reaches the output
        assert bool(jnp.any(train_logits != eval_logits)) == changes


@pytest.mark.parametrize("model_cls", [LanguageModel, ScalarModel])
def test_only_adapters_and_a_scalar_head_train(model_cls):
    mesh = _one_device()
    model = model_cls(dataclasses.replace(LLAMA, lora=ADAPTERS))
    params, _ = parameters.create(model, mesh, jax.random.PRNGKey(0))
    if model_cls is ScalarModel:  # a head as from an RM (a fresh one is zero: no gradient would reach lora_b)
        params = dict(params, head=dict(params["head"], kernel=params["head"]["kernel"] + 0.1))
    tx = optax.adam(1e-2)
    state, state_sh = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(1), params)
    trainable, frozen = jax.tree.map(np.asarray, lora.split_trainable(state.params))  # host copies: steps donate
    expected = lora.adapter_params(state.params)
    if model_cls is ScalarModel:
        expected = dict(expected, head=state.params["head"])
    assert jax.tree.structure(trainable) == jax.tree.structure(expected)
    assert "embed" in frozen["backbone"] and "lm_head" not in trainable
    # Adam's mu and nu exist for the trainable part only
    assert lora.tree_bytes(state.opt_state) == 2 * lora.tree_bytes(trainable) + 4  # + its int32 count

    tokens = _tokens()
    batch = TokenBatch(tokens, jnp.ones(tokens.shape), jnp.ones_like(tokens),
                       jnp.broadcast_to(jnp.arange(10), tokens.shape))
    if model_cls is ScalarModel:  # a value-regression step through the same train-step machinery
        def loss_fn(p, b, rng, denominator):
            values, _ = model.apply({"params": p}, b.tokens)
            return jnp.mean((values - 1.0) ** 2), {}
        step = steps.make_train_step(loss_fn, lambda b: 1.0, tx, mesh, state_sh, TokenBatch)
    else:
        step = steps.make_sft_step(model, tx, mesh, state_sh)
    moved = []
    for _ in range(2):
        state, _ = step(state, batch)
        new_trainable, new_frozen = lora.split_trainable(state.params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new_frozen, frozen)
        moved.append(jax.tree_util.tree_flatten_with_path(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_trainable, trainable))[0])
    # step 1: lora_b (zero) gets the gradient, lora_a none (its gradient goes through lora_b)
    assert all(flag == (path[-1].key != "lora_a") for path, flag in moved[0])
    assert all(flag for _, flag in moved[1])  # step 2: every trainable leaf moved


@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan_layers"])
def test_adapters_are_sharded_by_the_rules_table(stacked, eight_devices):
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2), eight_devices)
    model = LanguageModel(dataclasses.replace(LLAMA, scan_layers=stacked, lora=ADAPTERS))
    target = parameters.abstract(model, mesh)
    layer = target["backbone"]["layers" if stacked else "layers_0"]
    lead = (None,) if stacked else ()
    spec = lambda leaf: tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))  # noqa: E731
    # the in/out axes shard as the kernel's (embed: fsdp, heads / kv_heads / mlp: tensor); the rank is whole
    assert spec(layer["attn"]["query"]["lora_a"]) == lead + ("fsdp", None)
    assert spec(layer["attn"]["query"]["lora_b"]) == lead + (None, "tensor", None)
    assert spec(layer["mlp"]["fc_out"]["lora_a"]) == lead + ("tensor", None)
    assert spec(layer["mlp"]["fc_out"]["lora_b"]) == lead + (None, "fsdp")
    sharding.check_divisible(target, parameters.shardings_of(target))  # the mesh's axes divide every adapter


def test_loads_give_base_plus_fresh_adapters_and_exports_hold_the_merged_model(tmp_path):
    mesh = _one_device()
    base, _ = parameters.create(LanguageModel(LLAMA), mesh, jax.random.PRNGKey(0))
    plain_export = checkpoint.export_params(tmp_path / "plain", base, LLAMA)
    model = LanguageModel(dataclasses.replace(LLAMA, lora=ADAPTERS))
    params, _ = parameters.load(str(plain_export), model, mesh, "init_from")
    jax.tree.map(np.testing.assert_array_equal, lora.base_params(params), base)
    query = params["backbone"]["layers_0"]["attn"]["query"]
    assert not np.asarray(query["lora_b"]).any()  # B = 0
    bound = 1 / np.sqrt(32)  # PEFT's lora_A: kaiming-uniform over fan-in 32
    assert 0.5 * bound < float(jnp.abs(query["lora_a"]).max()) <= bound

    trained = _with_random_b(params)
    export = checkpoint.export_params(tmp_path / "lora", trained, model.cfg, {"stage": "sft"})
    meta = json.loads((export / "export.json").read_text())
    assert meta["model"]["lora"]["rank"] == 0 and meta["lora"]["rank"] == 4  # merged; trained with rank 4
    merged, _ = parameters.load(str(export), LanguageModel(LLAMA), mesh, "init_from")
    tokens = _tokens()
    np.testing.assert_allclose(_logits(LanguageModel(LLAMA), merged, tokens),
                               _logits(model, trained, tokens), atol=MERGE_TOL)
    # a LoRA model of other settings loads the merged export as its base, under fresh adapters
    again, _ = parameters.load(str(export), LanguageModel(dataclasses.replace(LLAMA, lora=LoRAConfig(rank=2))),
                               mesh, "init_from")
    jax.tree.map(np.testing.assert_array_equal, lora.base_params(again), merged)


@pytest.mark.parametrize("family, stacked, targets", [
    ("llama", False, ("all-linear",)),
    ("gpt2", True, ("query", "value", "c_proj", "c_fc")),  # part of GPT-2's fused c_attn: a rank-2r block
])
def test_peft_loads_our_adapter_and_computes_our_logits(family, stacked, targets, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from rlhf_jax.models.hf_config import model_config_from_hf
    from rlhf_jax.models.peft import export_peft

    special = dict(vocab_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_cfg = (transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False, **special) if family == "llama"
              else transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=40, **special))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(tmp_path / "hf")
    cfg = dataclasses.replace(model_config_from_hf(tmp_path / "hf"), scan_layers=stacked,
                              lora=LoRAConfig(rank=4, alpha=6.0, target_modules=targets))
    model = LanguageModel(cfg)
    params = _with_random_b(parameters.load(str(tmp_path / "hf"), model, _one_device(), "hf")[0])
    adapter = export_peft(params, cfg, tmp_path / "adapter", str(tmp_path / "hf"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    if family == "gpt2":  # query + value of c_attn: one adapter of rank 8, alpha 12 (scaling 6 / 4 kept)
        assert (config["rank_pattern"], config["alpha_pattern"]) == ({"c_attn": 8}, {"c_attn": 12.0})
        assert sorted(config["target_modules"]) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                            adapter).eval()
    tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
    with torch.no_grad():
        theirs = loaded(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(_logits(model, params, jnp.asarray(tokens)))
    base = _logits(LanguageModel(dataclasses.replace(cfg, lora=LoRAConfig())), lora.base_params(params),
                   jnp.asarray(tokens))
    assert float(np.abs(ours - np.asarray(base)).max()) > 0.1  # the adapter matters
    np.testing.assert_allclose(ours, theirs, atol=MERGE_TOL)


def test_the_size_check_counts_what_lora_trains(monkeypatch, eight_devices):
    """A training state is every parameter plus 3 copies (gradient, AdamW's moments) of what
    trains: SmolLM2-135M's 4 x 538 MB in f32, or with rank-16 LoRA on a bfloat16 base
    269 MB + 4 x 19.5 MB of float32 adapters. Under 1 GiB only the second fits."""
    from rlhf_jax import sizing

    monkeypatch.setattr(sizing, "device_memory_bytes", lambda devices: (2 ** 30, "1 GiB (test)"))
    smollm2 = ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                          d_ff=1536, tie_embeddings=True)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), eight_devices[:1])
    with pytest.raises(ConfigError, match=r"134,515,008 parameters .* need at least 2.0 GiB"):
        sizing.check_fits(smollm2, mesh)
    adapted = dataclasses.replace(smollm2, param_dtype="bfloat16", lora=LoRAConfig(rank=16))
    assert sizing.training_state_bytes(adapted) == (134_515_008 * 2 + 4 * 4 * 4_884_480, 4_884_480)
    sizing.check_fits(adapted, mesh)


def test_rlhf_jax_compile_builds_ppo_with_lora_as_the_stage_does(eight_devices):
    """``rlhf-jax compile``'s PPO programs hold what stages/ppo.py holds with LoRA: the EMA and
    the gradients of the adapters only, the policy's base as the KL reference, a plain RM."""
    from rlhf_jax.aot.programs import ppo_programs
    from rlhf_jax.config import DataConfig, GenerationConfig, PPOConfig, SamplingConfig
    from tests.helpers import tiny_config

    cfg = dataclasses.replace(tiny_config("unused.jsonl"), model=dataclasses.replace(LLAMA, lora=ADAPTERS), ppo=PPOConfig(
        prompts=DataConfig(batch_size=16, max_len=8), minibatch_size=8),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=4)))
    mesh = sharding.make_mesh(MeshConfig(data=-1), eight_devices)
    programs = {p.name: p for p in ppo_programs(cfg, mesh)}
    update, experience = programs["update"], programs["experience"]
    assert not lora.base_params(update.state.ema_params) and not lora.base_params(update.trainable[0])
    assert not lora.has_adapters(experience.args[1]) and not lora.has_adapters(experience.args[2])  # ref, RM
    with sharding.activate(mesh):
        update.jitted.lower(*update.args).compile()  # the EMA's tree is the adapters' (else a tree mismatch)
