"""LoRA adapters as params: which leaves train, the base without them, and merging them in.

The adapters live beside the kernel they adapt (``.../attn/query/{kernel, lora_a, lora_b}``,
see :class:`~rlhf_jax.models.transformer.Dense`), so one params tree holds the whole model
and every forward pass (sampler, scoring, evaluation) takes it as before. What trains is a
rule on that tree (:func:`split_trainable`): with adapters in it, only the adapters and a
scalar model's ``head``; without, everything. Steps differentiate and optimise the
trainable part only, so gradients and optimiser state exist for nothing else.

The functions walk nested dicts and treat anything else as a leaf, so they work on arrays,
ShapeDtypeStructs, shardings and ``nn.Partitioned`` boxes alike.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

ADAPTER_LEAVES = ("lora_a", "lora_b")
SCALAR_HEAD = "head"  # a ScalarModel's head (reward or value): trains with the adapters


def _is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES


def _select(tree: Any, keep: Callable[[tuple[str, ...]], bool], path: tuple[str, ...] = ()) -> Any:
    """The sub-tree of ``tree`` whose leaves' paths ``keep`` accepts (empty dicts dropped)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = _select(value, keep, path + (key,))
            if sub:
                out[key] = sub
        elif keep(path + (key,)):
            out[key] = value
    return out


def has_adapters(params: Any) -> bool:
    """Whether ``params`` holds LoRA adapters (a model with ``model.lora.rank`` > 0)."""
    return bool(_select(params, _is_adapter))


def split_trainable(params: Any) -> tuple[Any, Any]:
    """(trainable, frozen) sub-trees of ``params``; :func:`merge` joins them again.

    With adapters: the adapters and a top-level scalar ``head`` train, the rest (the base
    weights, embeddings, norms, an untied LM head) is frozen. Without: everything trains
    and ``frozen`` is ``{}``, so a full fine-tuning state is what it always was."""
    if not has_adapters(params):
        return params, {}
    trains = lambda path: _is_adapter(path) or path[0] == SCALAR_HEAD  # noqa: E731
    return _select(params, trains), _select(params, lambda path: not trains(path))


def merge(a: Any, b: Any) -> Any:
    """The union of two trees with disjoint leaves (e.g. :func:`split_trainable`'s halves)."""
    if isinstance(b, dict) and not b:  # a full fine-tuning state's frozen half
        return a
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise ValueError("merge: a leaf is on both sides (the trees must be disjoint)")
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out else value
    return out


def adapter_params(params: Any) -> Any:
    """Only the adapter leaves of ``params``."""
    return _select(params, _is_adapter)


def base_params(params: Any) -> Any:
    """``params`` less the adapters: applied through the same model, the adapters are off
    (the base projection only), and no array is copied. PPO's KL reference."""
    return _select(params, lambda path: not _is_adapter(path))


def low_rank_delta(lora_a: jax.Array, lora_b: jax.Array, kernel_ndim: int, scaling: float) -> jax.Array:
    """``scaling * lora_a lora_b`` shaped as the kernel (``in_dims + features``, with a
    leading layer axis on all three when the layers are stacked), in float32."""
    stacked = lora_a.ndim + lora_b.ndim - 2 - kernel_ndim  # 1 when every leaf has the [L] axis
    contract = lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)  # noqa: E731
    delta = jax.vmap(contract)(lora_a, lora_b) if stacked else contract(lora_a, lora_b)
    return delta * scaling


def merge_adapters(params: Any, scaling: float) -> Any:
    """``params`` with every adapter folded into its kernel (``W + scaling * A B``, in float32
    then the kernel's dtype) and removed: the plain model that computes the same function."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params:
        kernel = params["kernel"]
        delta = low_rank_delta(params["lora_a"], params["lora_b"], kernel.ndim, scaling)
        merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        return {k: merged if k == "kernel" else v for k, v in params.items() if k not in ADAPTER_LEAVES}
    return {k: merge_adapters(v, scaling) for k, v in params.items()}


def count_params(tree: Any) -> int:
    """Number of scalars in ``tree`` (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
