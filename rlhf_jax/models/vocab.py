"""A vocabulary padded inside the model (as Megatron and MaxText do), and the real size outside.

``ModelConfig.vocab_pad_multiple`` rounds the embedding's (and an untied ``lm_head``'s)
vocabulary up to ``padded_vocab_size`` rows, so that the tensor axis which splits the
``vocab`` logical axis divides it. The padded ids are not tokens:

- :func:`mask_padded_logits` sets their logits to :data:`MASKED_LOGIT` before they leave
  :class:`~rlhf_jax.models.LanguageModel`, so softmax gives them probability exactly 0 and
  the sampler, log-probs, KL and entropy never see them (``logits.shape[-1]`` is still the
  padded size);
- no real token indexes their embedding rows, and masked logits pass no gradient back,
  so their rows get zero gradient and only weight decay moves them;
- exports keep the real ``vocab_size`` (:func:`unpad_vocab`), and a real-size export or
  HF checkpoint is padded back onto a padded model (:func:`real_vocab_target`, then
  :func:`pad_vocab`; ``models.hf`` pads while reading each shard).

With ``vocab_pad_multiple=1``, or a vocabulary the multiple already divides, every function
here returns its input and the model computes exactly what it did without padding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ModelConfig
from rlhf_jax.sharding import vocab_axis

Array = jax.Array

# Finite, not -inf: softmax still gives exactly 0 (exp(-1e9 - max) underflows in f32), but
# entropy's p * log p stays 0 * finite = 0 rather than 0 * -inf = NaN, and dividing by a
# sampling temperature cannot overflow it to -inf (finfo(f32).min / 0.7 would).
MASKED_LOGIT = -1e9


def mask_padded_logits(logits: Array, vocab_size: int) -> Array:
    """``[..., Vp] f32`` logits with the ids ``>= vocab_size`` set to :data:`MASKED_LOGIT`.
    When ``Vp == vocab_size`` (no padding) the input is returned untouched: no op is added."""
    if logits.shape[-1] == vocab_size:
        return logits
    real = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(real, logits, jnp.asarray(MASKED_LOGIT, logits.dtype))


def _map_vocab_leaves(fn, tree: Any, *rest: Any) -> Any:
    """``fn(axis, leaf, *rest_leaves)`` on the vocabulary parameters; others unchanged."""
    def visit(key_path, leaf, *others):
        axis = vocab_axis(key_path)
        return leaf if axis is None else fn(axis, leaf, *others)
    return jax.tree_util.tree_map_with_path(visit, tree, *rest)


def unpad_vocab(params: Any, cfg: ModelConfig) -> Any:
    """``params`` with the vocabulary parameters cut to ``cfg.vocab_size`` rows (what an
    export stores). Arrays of any sharding; a leaf already that size is returned as is."""
    def cut(axis, leaf):
        if leaf.shape[axis] == cfg.vocab_size:
            return leaf
        if leaf.shape[axis] < cfg.vocab_size:
            raise ValueError(f"vocabulary axis {axis} of shape {tuple(leaf.shape)} is smaller than "
                             f"model.vocab_size={cfg.vocab_size}")
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return jax.lax.slice_in_dim(leaf, 0, cfg.vocab_size, axis=axis)
        # the real size is split by no axis: the cut leaf keeps the other dims' sharding
        return jax.jit(lambda x: jax.lax.slice_in_dim(x, 0, cfg.vocab_size, axis=axis),
                       out_shardings=_without_axis(sharding, axis, leaf.ndim))(leaf)
    return _map_vocab_leaves(cut, params)


def _without_axis(sharding: Any, axis: int, ndim: int) -> Any:
    """``sharding`` with dim ``axis`` replicated: a real-size vocabulary is split by no axis."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    spec[axis] = None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def real_vocab_target(target: Any, cfg: ModelConfig) -> Any:
    """The restore target of a real-size export for padded params ``target``
    (ShapeDtypeStructs): vocabulary leaves get ``cfg.vocab_size`` rows and that dim
    replicated (the mesh's tensor axis need not divide the real size); others unchanged."""
    def real(axis, leaf):
        if leaf.shape[axis] == cfg.vocab_size:
            return leaf
        shape = tuple(cfg.vocab_size if i == axis else n for i, n in enumerate(leaf.shape))
        return jax.ShapeDtypeStruct(shape, leaf.dtype,
                                    sharding=_without_axis(getattr(leaf, "sharding", None), axis, len(shape)))
    return _map_vocab_leaves(real, target)


def pad_vocab(params: Any, target: Any) -> Any:
    """``params`` with each vocabulary parameter zero-padded to ``target``'s shape and placed
    in ``target``'s sharding (``target``: arrays or ShapeDtypeStructs, e.g. the padded model's
    ``parameters.abstract``). Leaves already ``target``'s shape are returned as is."""
    def pad(axis, leaf, want):
        if tuple(leaf.shape) == tuple(want.shape):
            return leaf
        others = [i for i in range(leaf.ndim) if i != axis]
        if leaf.ndim != len(want.shape) or any(leaf.shape[i] != want.shape[i] for i in others) \
                or leaf.shape[axis] > want.shape[axis]:
            raise ValueError(f"vocabulary parameter of shape {tuple(leaf.shape)} cannot be padded to "
                             f"{tuple(want.shape)} (only its axis {axis} may be shorter)")
        widths = [(0, 0)] * leaf.ndim
        widths[axis] = (0, want.shape[axis] - leaf.shape[axis])
        sharding = getattr(want, "sharding", None)
        if isinstance(leaf, np.ndarray) or sharding is None:
            return jnp.pad(jnp.asarray(leaf, want.dtype), widths)
        # jitted so the padded array is born in its shards (never whole on one device)
        return jax.jit(lambda x: jnp.pad(x.astype(want.dtype), widths), out_shardings=sharding)(leaf)
    return _map_vocab_leaves(pad, params, target)
