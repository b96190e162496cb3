"""HF checkpoints: our logits and greedy decoding equal ``transformers``' PyTorch models;
export loads in ``transformers``; load -> export -> load is the identity; sharded loading;
clear errors for what we cannot represent."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import checkpoint, convert, sharding  # noqa: E402
from rlhf_jax.config import MeshConfig  # noqa: E402
from rlhf_jax.models import KVCache, LanguageModel, hf, positions_from_segments  # noqa: E402
from rlhf_jax.models.hf_config import model_config_from_hf  # noqa: E402
from rlhf_jax.parameters import abstract as abstract_params  # noqa: E402
from tests.helpers import assert_f32_close, forward_sums  # noqa: E402

VOCAB = 64  # divisible by the tensor axis of the 2x2x2 mesh
# No special tokens: HF generate must not stop early or bias EOS, so it stays plain greedy.
NO_SPECIAL = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# Non-default eps, rope_theta, n_inner and head_dim so a field we fail to map shows in the logits.
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-3, rope_theta=500.0, **NO_SPECIAL)
CASES = {
    "gpt2-tied": lambda: transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=40,
                                                 layer_norm_epsilon=1e-3, **NO_SPECIAL),
    "llama-gqa-untied": lambda: transformers.LlamaConfig(num_key_value_heads=2, head_dim=16,
                                                         tie_word_embeddings=False, **LLAMA),
    "llama-tied": lambda: transformers.LlamaConfig(tie_word_embeddings=True, **LLAMA),
    "qwen2-bias": lambda: transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **LLAMA),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, sliding_window=None,
                                                  tie_word_embeddings=False, **LLAMA),
}
SHARDED = {"llama-gqa-untied"}  # saved as several files with model.safetensors.index.json


def _randomise(model):
    """HF initialises biases to 0 and norms to 1, which would hide a mis-mapped bias or norm."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(centre + 0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """case -> a saved random HF checkpoint directory (built once per module)."""
    built = {}

    def build(case):
        if case not in built:
            model = transformers.AutoModelForCausalLM.from_config(CASES[case]())
            _randomise(model)
            built[case] = tmp_path_factory.mktemp(case)
            model.save_pretrained(built[case], max_shard_size="20KB" if case in SHARDED else "1GB")
        return built[case]

    return build


def _hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _load(directory, mesh=None, stacked=False):
    """(config, params) of an HF directory; ``stacked``: with ``model.scan_layers``."""
    mesh = mesh or sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    cfg = dataclasses.replace(model_config_from_hf(directory), scan_layers=stacked)
    return cfg, hf.load_hf_params(directory, cfg, abstract_params(LanguageModel(cfg), mesh))


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _hf_logits(model, tokens, segments):
    """Positions given explicitly: HF derives none from the attention mask in a forward pass."""
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens)), attention_mask=torch.tensor(np.asarray(segments > 0)),
                    position_ids=torch.tensor(np.asarray(positions_from_segments(segments))))
    return out.logits.numpy()


def _batch():
    """[3, 12]: a full row, a right-padded row, a left-padded row."""
    tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 12))
    segments = np.ones((3, 12), np.int32)
    segments[1, 7:] = 0
    segments[2, :5] = 0
    return jnp.asarray(tokens * segments), jnp.asarray(segments)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(checkpoint_dir, case):
    directory = checkpoint_dir(case)
    assert (directory / hf.INDEX_FILE).is_file() == (case in SHARDED)
    cfg, params = _load(directory)
    _assert_logits_match_transformers(directory, cfg, params)


def _assert_same_logits(ours, theirs, cfg):
    """torch adds up every sum of the forward pass its own way (tests.helpers.f32_rtol), and its
    activation, RoPE and normalisation functions round otherwise: one more rounding each, a layer."""
    assert_f32_close(ours, theirs, forward_sums(cfg, 12), ops=2 + 3 * cfg.n_layers)


def _assert_logits_match_transformers(directory, cfg, params):
    tokens, segments = _batch()
    ours, _ = jax.jit(LanguageModel(cfg).apply)({"params": params}, tokens, segment_ids=segments)
    theirs = _hf_logits(_hf_model(directory), tokens, segments)
    valid = np.asarray(segments > 0)
    _assert_same_logits(np.asarray(ours)[valid], theirs[valid], cfg)


def _assert_export_round_trips(directory, cfg, params, out):
    """Our export of ``params`` holds the HF checkpoint's tensors exactly, and reloads equal."""
    hf.export_hf(params, cfg, out)
    original, exported = _hf_model(directory).state_dict(), _hf_model(out).state_dict()
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    _, again = _load(out, stacked=cfg.stacked)
    _assert_trees_equal(params, again)


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa-untied", "qwen2-bias"])
def test_export_loads_in_transformers_and_round_trips(checkpoint_dir, case, tmp_path):
    directory = checkpoint_dir(case)
    cfg, params = _load(directory)
    _assert_export_round_trips(directory, cfg, params, tmp_path / "out")


def _greedy(cfg, params, prompts, segments, steps):
    """Prefill the (left-padded) prompts, then feed back the argmax one token at a time.
    Returns (tokens [B, steps], smallest top-1 minus top-2 logit margin seen)."""
    apply = jax.jit(LanguageModel(cfg).apply)
    positions = positions_from_segments(segments)
    cache = KVCache.init(cfg, batch=prompts.shape[0], slots=prompts.shape[1] + steps)
    logits, cache = apply({"params": params}, prompts, positions, segments, cache=cache)
    position, out, margin = positions[:, -1:], [], np.inf
    for _ in range(steps):
        top2 = np.sort(np.asarray(logits[:, -1]), axis=-1)[:, -2:]
        margin = min(margin, float((top2[:, 1] - top2[:, 0]).min()))
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None]
        out.append(token)
        position = position + 1
        logits, cache = apply({"params": params}, token, position, cache=cache)
    return np.asarray(jnp.concatenate(out, axis=1)), margin


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa-untied"])
def test_greedy_kv_cache_decoding_matches_generate(checkpoint_dir, case):
    directory = checkpoint_dir(case)
    cfg, params = _load(directory)
    prompts = jnp.asarray(np.random.default_rng(2).integers(1, VOCAB, (2, 6)))
    segments = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]])
    ours, margin = _greedy(cfg, params, prompts * segments, segments, steps=8)
    assert margin > 1e-3, "near-tie in argmax: pick another seed, the comparison would be luck"
    with torch.no_grad():
        theirs = _hf_model(directory).generate(
            torch.tensor(np.asarray(prompts * segments)), attention_mask=torch.tensor(np.asarray(segments)),
            max_new_tokens=8, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(ours, theirs[:, 6:].numpy())


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa-untied"])
def test_loads_sharded_onto_a_2x2x2_mesh(checkpoint_dir, case, eight_devices):
    directory = checkpoint_dir(case)
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2), eight_devices)
    cfg = model_config_from_hf(directory)
    target = abstract_params(LanguageModel(cfg), mesh)
    params = hf.load_hf_params(directory, cfg, target)
    for (path, p), t in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(target)):
        assert (p.shape, p.dtype, p.sharding) == (t.shape, t.dtype, t.sharding), path
    kernel = params["backbone"]["layers_0"]["attn"]["query"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert kernel.addressable_shards[0].data.shape == (16, 2, cfg.dim_per_head)  # a quarter of it

    _, single = _load(directory)
    _assert_trees_equal(params, single)
    tokens, segments = _batch()
    tokens, segments = jnp.concatenate([tokens, tokens[:1]]), jnp.concatenate([segments, segments[:1]])
    with sharding.activate(mesh):
        ours, _ = jax.jit(LanguageModel(cfg).apply)({"params": params}, tokens, segment_ids=segments)
    valid = np.asarray(segments > 0)
    theirs = _hf_logits(_hf_model(directory), tokens, segments)
    _assert_same_logits(np.asarray(ours)[valid], theirs[valid], cfg)


def test_reward_model_backbone_loads_from_a_causal_lm(checkpoint_dir):
    from rlhf_jax.models import ScalarModel

    directory = checkpoint_dir("llama-gqa-untied")
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    cfg = model_config_from_hf(directory)
    target = abstract_params(ScalarModel(cfg), mesh)
    backbone = hf.load_hf_params(directory, cfg, {"backbone": target["backbone"]})
    _, lm = _load(directory)
    _assert_trees_equal(backbone["backbone"], lm["backbone"])
    with pytest.raises(hf.HFError, match="head/bias: not a parameter"):
        hf.load_hf_params(directory, cfg, target)


def test_bfloat16_checkpoint_loads_into_float32_and_bfloat16(tmp_path, checkpoint_dir):
    model = _hf_model(checkpoint_dir("llama-tied")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    embed = model.state_dict()["model.embed_tokens.weight"].float().numpy()
    cfg, params = _load(tmp_path / "bf16")
    assert params["backbone"]["embed"]["embedding"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["backbone"]["embed"]["embedding"]), embed)

    cfg = dataclasses.replace(cfg, param_dtype="bfloat16")
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params = hf.load_hf_params(tmp_path / "bf16", cfg, abstract_params(LanguageModel(cfg), mesh))
    assert params["backbone"]["embed"]["embedding"].dtype == jnp.bfloat16
    hf.export_hf(params, cfg, tmp_path / "out")
    exported = _hf_model(tmp_path / "out").state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == exported[name].dtype == torch.bfloat16 and torch.equal(tensor, exported[name]), name


def test_convert_cli_round_trip(checkpoint_dir, tmp_path, capsys):
    directory = checkpoint_dir("qwen2-bias")
    (directory / "tokenizer.json").write_text("{}")  # any file named like a tokenizer's is copied
    export, back = tmp_path / "export", tmp_path / "hf"
    assert convert.main(["--from-hf", str(directory), "--out", str(export)]) == 0
    meta = checkpoint.read_export_meta(export)["model"]
    assert meta["qkv_bias"] and meta["hf_path"] is None
    assert convert.main(["--to-hf", str(export), "--out", str(back), "--tokenizer", str(directory)]) == 0
    assert (back / "tokenizer.json").read_text() == "{}"
    original, converted = _hf_model(directory).state_dict(), _hf_model(back).state_dict()
    for name, tensor in original.items():
        assert torch.equal(tensor, converted[name]), name
    assert convert.main(["--to-hf", str(directory), "--out", str(back)]) == 2
    assert "already a HF checkpoint" in capsys.readouterr().err


def _config_dir(tmp_path, hf_config, **edits):
    (tmp_path / "config.json").write_text(json.dumps({**hf_config.to_dict(), **edits}))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "bert"}, "model_type='bert' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "rope_parameters.rope_type='llama3'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type='linear'"),
], ids=["model_type", "activation", "out-bias", "rope-scaling", "old-rope-scaling"])
def test_unsupported_llama_configs_name_the_field(tmp_path, edit, message):
    with pytest.raises(hf.HFError, match=message):
        model_config_from_hf(_config_dir(tmp_path, transformers.LlamaConfig(**LLAMA), **edit))


def test_unsupported_gpt2_activation_and_active_sliding_window(tmp_path):
    gpt2 = transformers.GPT2Config(activation_function="relu", **NO_SPECIAL)
    with pytest.raises(hf.HFError, match="activation_function='relu'"):
        model_config_from_hf(_config_dir(tmp_path, gpt2))
    mistral = transformers.MistralConfig(num_key_value_heads=2, sliding_window=16, **LLAMA)
    with pytest.raises(hf.HFError, match="sliding_window=16 is active"):
        model_config_from_hf(_config_dir(tmp_path, mistral))
    # a window as long as the context masks nothing
    wide = transformers.MistralConfig(num_key_value_heads=2, sliding_window=64, **LLAMA)
    assert model_config_from_hf(_config_dir(tmp_path, wide)).max_len == 64


def test_missing_or_misshapen_tensor_is_a_clear_error(checkpoint_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    source = checkpoint_dir("llama-tied")
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    tensors = load_file(source / hf.SINGLE_FILE)
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / hf.SINGLE_FILE, {"format": "pt"})
    with pytest.raises(hf.HFError, match=rf"model.safetensors: tensor {name} \(for our "
                                         r"backbone/layers_1/attn/key/kernel\) is missing"):
        _load(tmp_path)
    cfg = dataclasses.replace(model_config_from_hf(source), d_ff=40)
    target = abstract_params(LanguageModel(cfg), sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    with pytest.raises(hf.HFError, match=r"mlp.down_proj.weight has shape \(32, 48\), expected \(32, 40\)"):
        hf.load_hf_params(source, cfg, target)
    extra = {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]}
    save_file(extra, tmp_path / hf.SINGLE_FILE, {"format": "pt"})
    with pytest.raises(hf.HFError, match=r"layers.2.mlp.up_proj.weight.*no place in a llama model with 2"):
        _load(tmp_path)


def test_original_gpt2_names_and_buffers_load(checkpoint_dir, tmp_path):
    """OpenAI's GPT-2 checkpoints have no ``transformer.`` prefix and carry mask buffers."""
    from safetensors.numpy import load_file, save_file

    source = checkpoint_dir("gpt2-tied")
    shutil.copy(source / "config.json", tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(source / hf.SINGLE_FILE).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, tmp_path / hf.SINGLE_FILE, {"format": "pt"})
    _, renamed = _load(tmp_path)
    _, original = _load(source)
    _assert_trees_equal(renamed, original)


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa-untied"])
def test_stacked_model_loads_matches_transformers_and_round_trips(checkpoint_dir, case, tmp_path):
    """model.scan_layers=True: HF's per-layer tensors stacked on load, unstacked on export."""
    from rlhf_jax.models import stack_layers

    directory = checkpoint_dir(case)
    cfg, params = _load(directory, stacked=True)
    kernel = params["backbone"]["layers"]["attn"]["query"]["kernel"]
    assert kernel.shape[0] == cfg.n_layers
    _, unrolled = _load(directory)
    _assert_trees_equal(params, stack_layers(unrolled))
    _assert_logits_match_transformers(directory, cfg, params)
    _assert_export_round_trips(directory, cfg, params, tmp_path / "out")


def test_stacked_model_loads_sharded_onto_a_2x2x2_mesh(checkpoint_dir, eight_devices):
    directory = checkpoint_dir("llama-gqa-untied")
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2), eight_devices)
    cfg, params = _load(directory, mesh, stacked=True)
    kernel = params["backbone"]["layers"]["attn"]["query"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    _, single = _load(directory, stacked=True)
    _assert_trees_equal(params, single)
