"""Mesh construction, logical rules, sharded init, and sharded == single-device maths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, parameters, sharding
from rlhf_jax.config import MeshConfig, ModelConfig
from rlhf_jax.models import LanguageModel
from tests.helpers import assert_f32_close, forward_sums

CFG = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=64, max_len=32, tie_embeddings=False)


def test_mesh_fills_the_minus_one_axis(eight_devices):
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("mesh_cfg, message", [
    (MeshConfig(data=3, fsdp=1, tensor=1), "needs 3 devices but 8 are available"),
    (MeshConfig(data=-1, fsdp=3, tensor=1), "do not divide the 8 available devices"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
    (MeshConfig(data=0, fsdp=1, tensor=1), "mesh.data=0"),
])
def test_bad_mesh_is_a_clear_error(eight_devices, mesh_cfg, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.make_mesh(mesh_cfg)


def test_params_are_born_sharded_by_logical_rules(eight_devices):
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    params, shardings = parameters.create(LanguageModel(CFG), mesh, jax.random.key(0))
    query = params["backbone"]["layers_0"]["attn"]["query"]["kernel"]  # (embed, heads, kv)
    assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    # each device holds 1/4 of it: embed over fsdp=2, heads over tensor=2
    assert query.addressable_shards[0].data.shape == (16, 2, 8)
    embed = params["backbone"]["embed"]["embedding"]  # (vocab, embed)
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_dimension_not_divisible_by_axis_is_a_clear_error(eight_devices):
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    bad = dataclasses.replace(CFG, n_kv_heads=2)  # kv_heads=2 over tensor=8
    with pytest.raises(sharding.ShardingError, match=r"key/kernel: dim 1 .* not divisible by mesh axes \('tensor',\)"):
        parameters.create(LanguageModel(bad), mesh, jax.random.key(0))


def test_unknown_logical_axis_is_a_clear_error():
    import flax.linen as nn

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "nonsense")), (1, 4))
            return x @ w

    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(sharding.ShardingError, match="'nonsense'.* has no rule"):
        parameters.create(Odd(), mesh, jax.random.key(0))


def test_parameter_without_logical_names_is_refused():
    import flax.linen as nn

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.astype(jnp.float32))

    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    with pytest.raises(sharding.ShardingError, match="params/Dense_0/bias: parameter has no logical axis names"):
        parameters.create(Plain(), mesh, jax.random.key(0))


def _loss_and_grads(mesh):
    model = LanguageModel(CFG)
    params, param_sh = parameters.create(model, mesh, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
    mask = (jnp.arange(16)[None, :] >= 4).astype(jnp.float32) * jnp.ones((8, 1))
    tokens, mask = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, mask))

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, tokens)
        return losses.sft_loss(logits, tokens, mask)[0]

    with sharding.activate(mesh):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(sharding.replicated(mesh), param_sh))(params)
    return loss, grads


def test_loss_and_gradients_on_2x2x2_mesh_equal_one_device(eight_devices):
    loss_1, grads_1 = _loss_and_grads(sharding.make_mesh(MeshConfig(1, 1, 1), devices=eight_devices[:1]))
    loss_8, grads_8 = _loss_and_grads(sharding.make_mesh(MeshConfig(2, 2, 2)))
    # every sum of the forward pass may add up in another order on the mesh; the loss adds the
    # softmax over the vocabulary and the mean over 8 x 16 positions; the gradients the
    # backward pass's sums, at the scale of the largest gradient (tests.helpers.f32_rtol)
    forward = [*forward_sums(CFG, 16), CFG.vocab_size, 8 * 16]
    assert_f32_close(loss_8, loss_1, forward)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_1))
    flat_1 = jax.tree_util.tree_flatten_with_path(grads_1)[0]
    for (path, g1), g8 in zip(flat_1, jax.tree.leaves(grads_8)):
        assert_f32_close(g8, g1, [*forward, *forward], scale=scale, err_msg=jax.tree_util.keystr(path))
