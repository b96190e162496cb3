"""An early size check: a model whose training state alone cannot fit in the memory of the
devices it runs on is refused before anything is written, instead of XLA running out of
memory after the first compile (``--model.n_layers=10000`` did, after 29 s, with
``config.json`` and the stage directory already written).

The estimate is a lower bound: the parameters, their gradients and AdamW's two moments,
four copies of the parameters in ``param_dtype``. Activations, the reference and value models
of PPO and XLA's temporaries come on top, so a model that passes may still not fit; one that
fails cannot.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np

from rlhf_jax.config import ConfigError, ModelConfig

STATE_COPIES = 4  # params, gradients, AdamW's mu and nu


@functools.lru_cache(maxsize=16)
def parameter_count(model_cfg: ModelConfig) -> int:
    """The language model's parameter count, from shapes alone (scanned, so tracing costs
    the same for any depth)."""
    from rlhf_jax.models import LanguageModel

    model = LanguageModel(dataclasses.replace(model_cfg, scan_layers=True))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))["params"])
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def device_memory_bytes(devices: list) -> tuple[int | None, str]:
    """The memory the devices of a mesh can hold, and what it is: the sum of each device's
    ``bytes_limit`` on an accelerator, the host's RAM on CPU (its devices share it)."""
    if all(d.platform == "cpu" for d in devices):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host's RAM"
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if any(limit is None for limit in limits):
        return None, "unknown"
    return sum(limits), f"{len(devices)} {devices[0].platform} devices"


def check_fits(model_cfg: ModelConfig, mesh) -> None:
    """Refuses a model whose training state (:data:`STATE_COPIES` copies of its params) is
    larger than the memory of ``mesh``'s devices, naming the fields that size it."""
    available, what = device_memory_bytes(list(mesh.devices.flat))
    if available is None:
        return
    count = parameter_count(model_cfg)
    needed = STATE_COPIES * count * np.dtype(model_cfg.param_dtype).itemsize
    if needed > available:
        raise ConfigError(
            f"model: {count:,} parameters (model.n_layers={model_cfg.n_layers}, d_model={model_cfg.d_model}, "
            f"d_ff={model_cfg.d_ff}, vocab_size={model_cfg.vocab_size}) need at least {needed / 2**30:,.1f} GiB "
            f"for a training state (params, gradients, AdamW moments in {model_cfg.param_dtype}), more than "
            f"the {available / 2**30:,.1f} GiB of {what}; use a smaller model or more devices")
