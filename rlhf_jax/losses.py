"""Every loss and estimator of the pipeline, as pure functions of arrays.

This is the researcher's file. Each loss takes arrays (shapes in the docstrings) and small
static arguments, and returns ``(scalar, metrics)`` where ``metrics`` is a flat dict with
``/``-separated keys. Nothing here sees a model, a mesh or an optimiser. Masked means keep
an explicit denominator so micro-batches and packed rows reduce exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def masked_sum(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask.astype(x.dtype))


def masked_mean(x: Array, mask: Array, denominator: Array | None = None) -> Array:
    """Mean of ``x`` over ``mask``; ``denominator`` overrides the mask's count (e.g. the
    token count of the whole batch when ``x`` is one micro-batch). Empty masks give 0."""
    if denominator is None:
        denominator = jnp.sum(mask.astype(jnp.float32))
    return masked_sum(x, mask) / jnp.maximum(denominator, 1.0)


def next_token_logprobs(logits: Array, tokens: Array) -> Array:
    """Log-probability of each next token.

    logits: ``[B, T, V] f32``, tokens: ``[B, T] int32`` -> ``[B, T-1] f32`` where entry t is
    ``log p(tokens[t+1] | tokens[:t+1])``.
    """
    return -optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])


def sft_loss(logits: Array, tokens: Array, loss_mask: Array,
             denominator: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy on the tokens ``loss_mask`` marks as targets.

    logits: ``[B, T, V] f32``; tokens: ``[B, T] int32``; loss_mask: ``[B, T]``, 1 where the
    token at that position is a target (so prompt tokens and padding cost nothing);
    denominator: target count to divide by (default: this batch's).
    Returns (mean NLL per target token, metrics).
    """
    target_mask = loss_mask[:, 1:].astype(jnp.float32)
    if denominator is None:
        denominator = jnp.sum(target_mask)
    nll = -next_token_logprobs(logits, tokens)
    loss = masked_mean(nll, target_mask, denominator)
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    metrics = {
        "sft/loss": loss,
        "sft/accuracy": masked_mean(correct, target_mask, denominator),
        "sft/target_tokens": jnp.sum(target_mask),
    }
    return loss, metrics
