"""model.vocab_pad_multiple: a vocabulary no mesh axis divides (GPT-2's 50257) is padded
inside the model. On a tensor-parallel mesh the padded model equals the unpadded one on one
device; padded ids get probability 0; exports and HF exports keep the real size; a
vocabulary that already divides changes nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, losses, parameters, sharding
from rlhf_jax.config import ConfigError, MeshConfig, ModelConfig
from rlhf_jax.default_config import default_config
from rlhf_jax.models import LanguageModel, ScalarModel, vocab
from rlhf_jax.parameters import abstract as abstract_params
from tests.helpers import assert_f32_close, forward_sums

GPT2_VOCAB = 50257  # = 29 * 1733: no mesh axis size divides it
# tiny widths, 8 heads so that the tensor axis of 8 splits them
GPT2 = ModelConfig(family="gpt2", vocab_size=GPT2_VOCAB, d_model=32, n_layers=2, n_heads=8, d_ff=64, max_len=32)
LLAMA_UNTIED = ModelConfig(family="llama", vocab_size=GPT2_VOCAB, d_model=32, n_layers=2, n_heads=8, d_ff=64,
                           max_len=32, tie_embeddings=False)


def _one_device():
    return sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _tensor_mesh():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))


def _pad_onto(params, cfg, mesh, model_cls=LanguageModel):
    """Real-size ``params`` -> ``model_cls(cfg)``'s padded params on ``mesh`` (how an export
    or HF checkpoint is restored onto a tensor-parallel mesh)."""
    target = abstract_params(model_cls(cfg), mesh)
    real = vocab.real_vocab_target(target, cfg)
    placed = jax.device_put(params, jax.tree.map(lambda t: t.sharding, real))
    return vocab.pad_vocab(placed, target), target


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, GPT2_VOCAB)
    # right-padded rows of 16, 11, 7, 16 tokens; loss on all but each row's first 3
    segments = (jnp.arange(16)[None, :] < jnp.array([[16], [11], [7], [16]])).astype(jnp.int32)
    loss_mask = (segments * (jnp.arange(16)[None, :] >= 3)).astype(jnp.float32)
    return tokens * segments, segments, loss_mask


def _logits_loss_grads(cfg, params, mesh):
    model = LanguageModel(cfg)
    tokens, segments, loss_mask = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in _batch())

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, tokens, segment_ids=segments)
        return losses.sft_loss(logits, tokens, loss_mask)[0], logits

    with sharding.activate(mesh):
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return np.asarray(logits), float(loss), grads


@pytest.mark.parametrize("cfg", [GPT2, LLAMA_UNTIED], ids=["gpt2-tied", "llama-untied"])
def test_padded_vocabulary_on_a_tensor_mesh_equals_one_device(cfg, eight_devices):
    params_1, _ = parameters.create(LanguageModel(cfg), _one_device(), jax.random.key(0))
    logits_1, loss_1, grads_1 = _logits_loss_grads(cfg, params_1, _one_device())

    padded = dataclasses.replace(cfg, vocab_pad_multiple=8)
    assert padded.padded_vocab_size == 50264
    params_8, _ = _pad_onto(params_1, padded, _tensor_mesh())
    embedding = params_8["backbone"]["embed"]["embedding"]
    assert embedding.shape == (50264, 32)
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # split 8 ways
    logits_8, loss_8, grads_8 = _logits_loss_grads(padded, params_8, _tensor_mesh())

    assert logits_8.shape[-1] == 50264
    # the tensor axis splits heads, d_ff and the vocabulary, so every sum of the forward pass
    # may add up in another order; the loss adds the softmax over the 50,257 words and the
    # mean over the 4 x 16 positions (tests.helpers.f32_rtol derives the bound)
    forward = forward_sums(cfg, 16)
    assert_f32_close(logits_8[..., :GPT2_VOCAB], logits_1, forward)
    assert (logits_8[..., GPT2_VOCAB:] == vocab.MASKED_LOGIT).all()  # the padding itself is exact
    assert_f32_close(loss_8, loss_1, [*forward, GPT2_VOCAB, 4 * 16])
    # the padded rows (embedding, and an untied head's columns) get exactly no gradient
    for path, grad in jax.tree_util.tree_flatten_with_path(grads_8)[0]:
        axis = vocab.vocab_axis(path)
        if axis is not None:
            assert not np.asarray(jax.lax.slice_in_dim(grad, GPT2_VOCAB, None, axis=axis)).any(), path
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_1))
    for (path, g1), g8 in zip(jax.tree_util.tree_flatten_with_path(grads_1)[0],
                              jax.tree.leaves(vocab.unpad_vocab(grads_8, padded))):
        # backward: the forward sums again, the softmax over the vocabulary and, for every
        # weight, the sum over the 4 x 16 positions, at the scale of the largest gradient (a
        # key bias's terms cancel to 0) (was atol=1e-7: 2.98e-7 on another machine)
        assert_f32_close(g8, g1, [*forward, *forward, GPT2_VOCAB, 4 * 16], scale=scale,
                         err_msg=jax.tree_util.keystr(path))


def test_padding_is_a_no_op_when_the_vocabulary_divides():
    """Same shapes, same random init, the same logits bit for bit: a multiple that divides
    the vocabulary (and the default multiple 1) add nothing to the model."""
    base = default_config().model
    assert base.vocab_pad_multiple == 1 and base.padded_vocab_size == base.vocab_size
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, base.vocab_size)
    divides = dataclasses.replace(base, vocab_pad_multiple=8)  # the task's 168 = 8 * 21
    outputs = []
    for cfg in (base, divides):
        model = LanguageModel(cfg)
        params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
        outputs.append((params, jax.jit(model.apply)({"params": params}, tokens)[0]))
    (params_a, logits_a), (params_b, logits_b) = outputs
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params_a, params_b)
    np.testing.assert_array_equal(np.asarray(logits_a), np.asarray(logits_b))
    assert vocab.mask_padded_logits(logits_a, base.vocab_size) is logits_a
    unpadded = vocab.unpad_vocab(params_a, divides)
    assert all(a is b for a, b in zip(jax.tree.leaves(unpadded), jax.tree.leaves(params_a)))


def test_export_of_a_padded_model_keeps_the_real_vocabulary_and_round_trips(eight_devices, tmp_path):
    padded = dataclasses.replace(GPT2, vocab_pad_multiple=8)
    params, shardings = parameters.create(LanguageModel(padded), _tensor_mesh(), jax.random.key(0))
    assert params["backbone"]["embed"]["embedding"].shape == (50264, 32)
    checkpoint.export_params(tmp_path / "export", params, padded)  # stores the real rows

    target = abstract_params(LanguageModel(padded), _tensor_mesh())
    stored = checkpoint.load_export(tmp_path / "export", vocab.real_vocab_target(target, padded), padded)
    assert stored["backbone"]["embed"]["embedding"].shape == (GPT2_VOCAB, 32)  # the real size on disk
    again = checkpoint.load_export(tmp_path / "export", target, padded)  # padded back onto the mesh
    for (path, a), b, t in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(again),
                               jax.tree.leaves(target)):
        assert (b.shape, b.sharding) == (t.shape, t.sharding), path
        axis = vocab.vocab_axis(path)
        real = np.asarray(a) if axis is None else np.asarray(a)[:GPT2_VOCAB]
        got = np.asarray(b) if axis is None else np.asarray(b)[:GPT2_VOCAB]
        np.testing.assert_array_equal(got, real, err_msg=jax.tree_util.keystr(path))
        if axis is not None:
            assert not np.asarray(b)[GPT2_VOCAB:].any()  # padded rows come back as zeros

    # the same export also restores onto one device with no padding
    single = checkpoint.load_export(tmp_path / "export", abstract_params(LanguageModel(GPT2), _one_device()))
    np.testing.assert_array_equal(np.asarray(single["backbone"]["embed"]["embedding"]),
                                  np.asarray(params["backbone"]["embed"]["embedding"])[:GPT2_VOCAB])


def test_scalar_model_backbone_is_padded_too(eight_devices):
    """A reward/value model on the same mesh has the same padded embedding (it starts from
    the LM's backbone); its scalar output does not depend on the padded rows."""
    padded = dataclasses.replace(GPT2, vocab_pad_multiple=8)
    lm, _ = parameters.create(LanguageModel(GPT2), _one_device(), jax.random.key(0))
    scalar_1 = ScalarModel(GPT2)
    params_1 = jax.jit(scalar_1.init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]
    params_1 = dict(params_1, backbone=lm["backbone"],
                    head={"kernel": jnp.full((32, 1), 0.1), "bias": jnp.zeros((1,))})
    params_8, target = _pad_onto(params_1, padded, _tensor_mesh(), ScalarModel)
    assert params_8["backbone"]["embed"]["embedding"].shape == (50264, 32)
    tokens, segments, _ = _batch()
    values_1, _ = jax.jit(scalar_1.apply)({"params": params_1}, tokens, segment_ids=segments)
    with sharding.activate(_tensor_mesh()):
        values_8, _ = jax.jit(ScalarModel(padded).apply)({"params": params_8}, tokens, segment_ids=segments)
    # the head sums 32 terms 0.1 * h_i of a layer-normed h (sum h_i^2 = 32, so |h_i| <= sqrt(32)),
    # which cancel to about 0: the terms' scale is sum|0.1| * sqrt(32), not the values'
    assert_f32_close(values_8, values_1, forward_sums(GPT2, 16), scale=0.1 * 32 * 32 ** 0.5)


def test_an_undivided_vocabulary_names_the_fix(eight_devices):
    with pytest.raises(sharding.ShardingError, match=r"embed/embedding: dim 0 of shape \(50257, 32\) is 50257, "
                                                     r"not divisible .* set model.vocab_pad_multiple"):
        parameters.create(LanguageModel(GPT2), _tensor_mesh(), jax.random.key(0))
    with pytest.raises(ConfigError, match="model.vocab_pad_multiple must be positive, got 0"):
        dataclasses.replace(GPT2, vocab_pad_multiple=0).validate()


def test_hf_checkpoint_loads_padded_and_exports_the_real_vocabulary(eight_devices, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.models import hf
    from rlhf_jax.models.hf_config import model_config_from_hf

    hf_cfg = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=8,
                                     n_inner=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = dataclasses.replace(model_config_from_hf(tmp_path / "hf"), vocab_pad_multiple=8)
    mesh = _tensor_mesh()
    params = hf.load_hf_params(tmp_path / "hf", cfg, abstract_params(LanguageModel(cfg), mesh))
    embedding = params["backbone"]["embed"]["embedding"]
    assert embedding.shape == (50264, 32) and embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    wte = hf_model.state_dict()["transformer.wte.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(embedding)[:GPT2_VOCAB], wte)
    assert not np.asarray(embedding)[GPT2_VOCAB:].any()

    tokens, segments, _ = _batch()
    with sharding.activate(mesh):
        ours, _ = jax.jit(LanguageModel(cfg).apply)({"params": params}, tokens, segment_ids=segments)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(np.asarray(tokens)), attention_mask=torch.tensor(np.asarray(segments))).logits
    valid = np.asarray(segments > 0)
    # torch adds up every sum of the forward pass its own way; GELU's tanh adds a rounding per layer
    assert_f32_close(np.asarray(ours)[..., :GPT2_VOCAB][valid], theirs.numpy()[valid], forward_sums(cfg, 16),
                     ops=2 + cfg.n_layers)

    hf.export_hf(params, cfg, tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.config.vocab_size == GPT2_VOCAB
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name
