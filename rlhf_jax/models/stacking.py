"""Unrolled (``layers_0 .. layers_{L-1}``) <-> scanned (one ``layers`` subtree whose leaves
have a leading ``[L]`` axis) decoder params; see ``ModelConfig.scan_layers``.

Both functions walk any params tree (a whole LanguageModel/ScalarModel's, or only the
backbone's) and convert every dict that holds the blocks; other leaves pass through.
``fn`` lets a caller convert something other than arrays (e.g. ShapeDtypeStructs).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"^layers_(\d+)$")


def _layer_keys(node: dict) -> list[str]:
    return sorted((k for k in node if _LAYER.match(k)), key=lambda k: int(_LAYER.match(k).group(1)))


def is_stacked(params: Any) -> bool | None:
    """True for scanned params, False for unrolled, None when there are no blocks."""
    if isinstance(params, dict):
        if "layers" in params and isinstance(params["layers"], dict):
            return True
        if _layer_keys(params):
            return False
        for value in params.values():
            found = is_stacked(value)
            if found is not None:
                return found
    return None


def stack_layers(params: Any, stack: Callable[[list], Any] | None = None) -> Any:
    """Unrolled -> scanned params (``layers_i/...`` leaves stacked on a new axis 0)."""
    stack = stack or (lambda leaves: jnp.stack(leaves))
    if not isinstance(params, dict):
        return params
    keys = _layer_keys(params)
    out = {k: stack_layers(v, stack) for k, v in params.items() if k not in keys}
    if keys:
        if [int(_LAYER.match(k).group(1)) for k in keys] != list(range(len(keys))):
            raise ValueError(f"blocks {keys} are not layers_0 .. layers_{len(keys) - 1}")
        out["layers"] = jax.tree.map(lambda *leaves: stack(list(leaves)), *[params[k] for k in keys])
    return out


def unstack_layers(params: Any, n_layers: int, take: Callable[[Any, int], Any] | None = None) -> Any:
    """Scanned -> unrolled params (``layers/...`` leaves ``[L, ...]`` -> ``layers_i/...``)."""
    take = take or (lambda leaf, i: leaf[i])
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key == "layers" and isinstance(value, dict):
            for i in range(n_layers):
                out[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: take(leaf, i), value)
        else:
            out[key] = unstack_layers(value, n_layers, take)
    return out
