"""What a program should need on one chip, worked out from the model and the mesh: the
bytes it holds (parameters, optimiser state, gradients, the activations its remat policy
keeps, the largest transient) and its model FLOPs. Beside the compiler's figures
(``rlhf_jax.aot.compile``) it says *why* a program needs what it needs.

Per device: ``rows`` are split over the batch axes (data x fsdp); heads, kv heads, the MLP
and the vocabulary over tensor; parameters as their shardings say (read from the abstract
arrays themselves, so the figure is exact for everything the program takes as arguments).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax import lm_terms, sharding
from rlhf_jax.config import ModelConfig
from rlhf_jax.models.attention import choose_attention

F32 = 4


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of the abstract arrays in ``tree`` (their shardings' shards)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        if getattr(leaf, "sharding", None) is not None:
            shape = leaf.sharding.shard_shape(shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Estimate:
    """Bytes per chip, by what holds them; ``flops``: model FLOPs of the whole program
    (6 x matmul params a token when differentiated, 2 x when not, plus attention; remat's
    recomputation not counted)."""

    arguments: int = 0  # what the program takes: params, optimiser state, batch
    params: int = 0  # of which parameters
    optimizer: int = 0  # of which optimiser state
    gradients: int = 0
    weights: int = 0  # a train step's weights gathered whole (per tensor shard) in the compute dtype
    activations: int = 0  # kept for the backward pass by the remat policy
    cache: int = 0  # a sampler's KV cache
    transient: int = 0  # the largest short-lived block
    transient_what: str = ""
    outputs: int = 0  # outputs not written over donated arguments
    flops: float = 0.0

    @property
    def total(self) -> int:
        return (self.arguments + self.outputs + self.gradients + self.weights + self.activations + self.cache
                + self.transient)


def _parts(mesh: Mesh, *axes: str) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _layer_shapes(cfg: ModelConfig, tensor: int) -> dict[str, int]:
    """Per token, one device's width of each activation of a block."""
    heads_dim = -(-cfg.n_heads // tensor) * cfg.dim_per_head
    kv_dim = -(-cfg.kv_heads // tensor) * cfg.dim_per_head
    mlp = -(-cfg.d_ff // tensor)
    return {"d": cfg.d_model, "q": heads_dim, "kv": kv_dim, "mlp": mlp, "heads": -(-cfg.n_heads // tensor)}


def _attention_path(cfg: ModelConfig, length: int) -> str:
    return choose_attention(cfg.attention_impl, "tpu", cfg.compute_dtype, cfg.dim_per_head, False, length)


def _kept_per_layer(cfg: ModelConfig, rows: int, length: int, w: dict[str, int]) -> int:
    """Bytes one block keeps for the backward pass under ``cfg.remat`` (rows on this device)."""
    c = jnp.dtype(cfg.compute_dtype).itemsize
    tokens = rows * length
    carry = tokens * w["d"] * c  # the block's input: every policy keeps it (the scan's carry)
    n_mlp = 2 if cfg.family == "llama" else 1
    projections = tokens * c * (w["q"] + 2 * w["kv"] + w["d"] + n_mlp * w["mlp"] + w["d"])
    scores = rows * w["heads"] * length * length  # XLA's attention: [rows, heads, T, T]
    xla_attention = _attention_path(cfg, length) == "xla"
    policy = cfg.remat_policy
    if policy == "nothing_saveable":
        return carry
    if policy == "dots_with_no_batch_dims_saveable":
        return carry + projections
    if policy == "dots_saveable":  # the attention einsums are dots too (on XLA's path)
        return carry + projections + (scores * c + tokens * w["q"] * c if xla_attention else 0)
    # no remat: the dots, the f32 norms' outputs, the MLP's product, XLA's scores and probabilities
    return (carry + projections + 2 * tokens * w["d"] * F32 + tokens * w["mlp"] * c
            + (scores * (F32 + c) + tokens * w["q"] * c if xla_attention else tokens * w["q"] * c))


def _layer_working_set(cfg: ModelConfig, rows: int, length: int, w: dict[str, int], differentiated: bool) -> int:
    """Bytes of one block's forward intermediates, alive while it (or its backward) runs."""
    c = jnp.dtype(cfg.compute_dtype).itemsize
    tokens = rows * length
    block = tokens * (3 * w["d"] * F32 + c * (w["q"] + 2 * w["kv"] + 3 * w["mlp"] + w["q"]))
    if _attention_path(cfg, length) == "xla":  # f32 scores (softmax fused into them going forward);
        block += (3 if differentiated else 1) * rows * w["heads"] * length * length * F32  # + probs, gradient
    return block


def _matmul_params(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    return cfg.n_layers * (d * (q + 2 * kv) + q * d + (3 if cfg.family == "llama" else 2) * d * f)


def pass_flops(cfg: ModelConfig, rows: int, length: int, differentiated: bool, unembeds: bool) -> float:
    """Model FLOPs of one pass over ``rows`` x ``length`` tokens (all devices)."""
    per_token = 2 * _matmul_params(cfg) + 4 * cfg.n_layers * length * cfg.n_heads * cfg.dim_per_head
    if unembeds:
        per_token += 2 * cfg.d_model * cfg.padded_vocab_size
    return (3 if differentiated else 1) * per_token * rows * length


def estimate(program, mesh: Mesh, output_bytes: int) -> Estimate:
    """The analytic figure of a :class:`~rlhf_jax.aot.programs.Program` on one chip of ``mesh``.
    ``output_bytes``: its outputs not aliased to donated inputs (from the abstract outputs)."""
    batch_shards, tensor = _parts(mesh, *sharding.BATCH_AXES), mesh.shape["tensor"]
    est = Estimate(arguments=device_bytes(program.args), outputs=output_bytes)
    state = program.state
    est.params = device_bytes(getattr(state, "params", state)) if not isinstance(state, tuple) else device_bytes(state)
    if hasattr(state, "opt_state"):
        est.optimizer = device_bytes(state.opt_state)
    elif hasattr(state, "policy"):  # an online method's: its train states (PPO's value model too) and the EMA
        trained = [state.policy] + ([state.value] if hasattr(state, "value") else [])
        est.params = device_bytes(([t.params for t in trained], state.ema_params))
        est.optimizer = device_bytes([t.opt_state for t in trained])
    if program.trainable is not None:
        est.gradients = device_bytes(program.trainable)
        # Observed in every train step compiled for TPU (docs/tpu.md): beyond the rest, a step
        # holds about a compute-dtype copy of all the weights it trains, split only by tensor
        # (most likely the FSDP shards of the scanned blocks gathered ahead of the loop).
        compute = jnp.dtype(program.passes[0][0].compute_dtype).itemsize
        elements = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(program.trainable))
        est.weights = elements * compute // tensor
    transients = []
    for cfg, rows, length, differentiated, unembeds in program.passes:
        local_rows = -(-rows // batch_shards)
        w = _layer_shapes(cfg, tensor)
        est.flops += pass_flops(cfg, rows, length, differentiated, unembeds)
        if differentiated:
            est.activations += cfg.n_layers * _kept_per_layer(cfg, local_rows, length, w)
        transients.append((_layer_working_set(cfg, local_rows, length, w, differentiated),
                           f"one block, {local_rows} x {length}"))
        if unembeds:
            with sharding.activate(mesh):
                chunk = lm_terms.logits_chunk(cfg, rows, length)
            vocab = -(-cfg.padded_vocab_size // tensor)
            logits = local_rows * chunk * vocab * F32 * (3 if differentiated else 2)  # logits, softmax, gradient
            transients.append((logits, f"logits chunk {local_rows} x {chunk} x {vocab}"))
        if differentiated:  # FSDP gathers one block's weights (and their gradient) at a time
            c = jnp.dtype(cfg.compute_dtype).itemsize
            transients.append((2 * _matmul_params(cfg) // cfg.n_layers // tensor * c, "one block's gathered weights"))
    if program.cache_tokens:
        cfg, rows, prompt = program.passes[0][:3]
        w = _layer_shapes(cfg, tensor)
        c = jnp.dtype(cfg.compute_dtype).itemsize
        local_rows = -(-rows // batch_shards)
        est.cache = 2 * cfg.n_layers * local_rows * w["kv"] * program.cache_tokens * c
        # the prefill attends over the whole cache through the mask path: f32 scores and
        # probabilities of every prompt token against every slot, one layer at a time
        prefill = local_rows * w["heads"] * prompt * program.cache_tokens * (F32 + c)
        transients.append((prefill, f"prefill scores {local_rows} x {w['heads']} x {prompt} x {program.cache_tokens}"))
    est.transient, est.transient_what = max(transients, default=(0, ""))
    return est
