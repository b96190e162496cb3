"""The device mesh, the one logical-axis rules table, and sharded state creation.

Model code names axes logically; :data:`LOGICAL_AXIS_RULES` is the only place that says
which mesh axis each name is split over. State shardings come from ``jax.eval_shape`` ->
``nn.get_partition_spec`` -> ``nn.logical_to_mesh_sharding``, and state is created by a
jitted function whose ``out_shardings`` are those, so parameters are born sharded.
Everything here checks its inputs before anything compiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits parameters

# logical name -> mesh axis (or None: replicated). Parameters: embed is split over fsdp
# (ZeRO-3 style) and the wide dims over tensor (Megatron style). Activations keep
# d_model whole (act_embed) and split the batch over data and fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("positions", None),
    ("layers", None),
    ("scalar", None),
)
KNOWN_LOGICAL_AXES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)


class ShardingError(ValueError):
    """A mesh that does not fit the devices, or an array an axis does not divide."""


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Builds a ``('data', 'fsdp', 'tensor')`` mesh; one axis of ``cfg`` may be -1 (fill)."""
    devices = jax.devices() if devices is None else devices
    shape = list(cfg.shape)
    for name, size in zip(MESH_AXES, shape):
        if size == 0 or size < -1:
            raise ShardingError(f"mesh.{name}={size}: axis sizes must be positive, or -1 to fill")
    fill = [i for i, size in enumerate(shape) if size == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh {cfg.shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if len(devices) % known:
            raise ShardingError(
                f"mesh {cfg.shape}: the fixed axes ({known} devices) do not divide the "
                f"{len(devices)} available devices")
        shape[fill[0]] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"{len(devices)} are available ({jax.default_backend()}); set mesh.data/fsdp/tensor "
            "so their product is the device count")
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh and rules in scope, so ``nn.with_logical_constraint`` applies while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# (last two path components of the parameter, its vocabulary axis): the embedding table
# [V, E] and an untied head's kernel [E, V], in a LanguageModel's, a ScalarModel's or a
# bare backbone's params.
VOCAB_PARAMS = {("embed", "embedding"): 0, ("lm_head", "kernel"): 1}


def _names(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def vocab_axis(key_path) -> int | None:
    """The vocabulary axis of the parameter at ``key_path`` (a jax key path or a tuple of
    names), None for a parameter without one."""
    return VOCAB_PARAMS.get(_names(key_path)[-2:])


def strip_boxes(tree: Any) -> Any:
    """The values inside ``nn.Partitioned`` boxes, with no sharding constraint applied."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def check_logical_names(boxed_tree: Any) -> None:
    """Every logical axis name in ``boxed_tree`` must have a rule."""
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for key_path, leaf in leaves:
        if isinstance(leaf, nn.Partitioned):
            unknown = [n for n in leaf.names if n is not None and n not in KNOWN_LOGICAL_AXES]
            if unknown:
                raise ShardingError(
                    f"{_path(key_path)}: logical axis {unknown} has no rule in "
                    "rlhf_jax.sharding.LOGICAL_AXIS_RULES")


def check_all_partitioned(boxed_params: Any, what: str = "params") -> None:
    """A parameter created without logical axis names would be silently replicated: refuse."""
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for key_path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            raise ShardingError(f"{what}/{_path(key_path)}: parameter has no logical axis names")


def check_divisible(abstract: Any, shardings: Any) -> None:
    """Each sharded dim must be a multiple of the mesh axes it is split over."""
    flat_shape = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_sharding = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (key_path, leaf), sharding in zip(flat_shape, flat_sharding):
        mesh_shape = sharding.mesh.shape
        for dim, axes in enumerate(sharding.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(mesh_shape[a] for a in axes)
            if leaf.shape[dim] % parts:
                hint = ""
                if vocab_axis(key_path) == dim:
                    hint = (f"; set model.vocab_pad_multiple to a multiple of {parts} (e.g. 128) to pad "
                            "the vocabulary inside the model (padded ids are masked out)")
                raise ShardingError(
                    f"{_path(key_path)}: dim {dim} of shape {tuple(leaf.shape)} is {leaf.shape[dim]}, "
                    f"not divisible by mesh axes {axes} of total size {parts}{hint}")


def logical_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves may be ``nn.Partitioned`` boxes (else replicated)."""
    check_logical_names(boxed_abstract)
    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


_ABSTRACT_CREATION: contextvars.ContextVar[bool] = contextvars.ContextVar("abstract_creation", default=False)


@contextlib.contextmanager
def abstract_creation():
    """Inside, :func:`sharded_create` allocates nothing and returns ``ShapeDtypeStruct``s
    with their shardings: how ``rlhf_jax.aot`` builds a stage's own train state for devices
    it cannot run on (a TPU slice described on a CPU host)."""
    token = _ABSTRACT_CREATION.set(True)
    try:
        yield
    finally:
        _ABSTRACT_CREATION.reset(token)


def sharded_create(create_fn: Callable[..., Any], mesh: Mesh, *args) -> tuple[Any, Any]:
    """Runs ``create_fn(*args)`` jitted so that its outputs are born sharded.

    ``create_fn`` may return ``nn.Partitioned`` boxes (as ``model.init`` and ``tx.init`` on
    boxed params do); the result is unboxed. Returns (state, shardings); under
    :func:`abstract_creation` the state is abstract.
    """
    with activate(mesh):
        boxed = jax.eval_shape(create_fn, *args)
        shardings = logical_shardings(boxed, mesh)
        check_divisible(strip_boxes(boxed), shardings)
        if _ABSTRACT_CREATION.get():
            return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shardings,
                                strip_boxes(boxed)), shardings
        state = jax.jit(lambda *a: strip_boxes(create_fn(*a)), out_shardings=shardings)(*args)
    return state, shardings


def sample_tokens(mesh: Mesh) -> jax.Array:
    """Init inputs whose batch divides the batch axes (activation constraints apply in init)."""
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    return jax.numpy.zeros((rows, 1), jax.numpy.int32)


def jit_under_mesh(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)``, traced and run with the mesh and axis rules in scope
    (so the model's logical constraints apply). ``.jitted`` is the underlying jit object."""
    jitted = jax.jit(fn, **jit_kwargs)

    def run(*args):
        with activate(mesh):
            return jitted(*args)

    run.jitted = jitted
    return run
