"""Struct dataclasses passed into and out of jitted steps (pytrees, never tuples)."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    step: ``[] int32`` optimiser steps taken; rng: a typed PRNG key (per-step keys are
    ``fold_in(rng, step)``, so resuming at step n replays the same randomness).
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array


@struct.dataclass
class TokenBatch:
    """A batch of token rows, all ``[B, T]``.

    tokens: int32 token ids (padding is ``pad_id``);
    loss_mask: float32, 1 where the token at that position is a training target
      (response tokens and EOS for SFT; every text token but a segment's first for LM data);
    segment_ids: int32, which example of the row each token belongs to, 0 for padding;
    positions: int32, position of each token within its example.
    """

    tokens: Array
    loss_mask: Array
    segment_ids: Array
    positions: Array


@struct.dataclass
class RankingBatch:
    """Comparison data: K responses per prompt, each a full (prompt + response) row.

    tokens, segment_ids, positions: ``[B, K, T]``; response_mask: ``[B, K, T] f32``, 1 on
    each response's tokens and EOS, the targets whose log-probs DPO sums (as
    :attr:`TokenBatch.loss_mask`); last_index: ``[B, K] int32``, position of each response's
    last token (where the reward is read); ranks: ``[B, K] int32`` (0 = best, equal = tie);
    mask: ``[B, K] bool``, real responses (K varies by prompt).
    """

    tokens: Array
    segment_ids: Array
    positions: Array
    response_mask: Array
    last_index: Array
    ranks: Array
    mask: Array


@struct.dataclass
class Rollout:
    """A batch of scored episodes, ready for PPO updates. B episodes, prompt length P,
    response length N, L = P + N.

    tokens, segment_ids, positions: ``[B, L]`` prompt (left-padded) then response;
    response_mask: ``[B, N] f32``, response tokens (including EOS);
    old_logprobs, ref_logprobs, old_values, advantages, returns: ``[B, N] f32``.
    """

    tokens: Array
    segment_ids: Array
    positions: Array
    response_mask: Array
    old_logprobs: Array
    ref_logprobs: Array
    old_values: Array
    advantages: Array
    returns: Array


@struct.dataclass
class GroupRollout:
    """Scored episodes of a critic-free method (RLOO, GRPO): B = prompts x group size
    episodes, a prompt's group adjacent. tokens, segment_ids, positions: ``[B, L]``;
    response_mask, old_logprobs, ref_logprobs: ``[B, N] f32``; advantages: ``[B] f32``, one
    per response."""

    tokens: Array
    segment_ids: Array
    positions: Array
    response_mask: Array
    old_logprobs: Array
    ref_logprobs: Array
    advantages: Array


@struct.dataclass
class PolicyState:
    """A critic-free online method's state: the policy, the EMA of its weights, and the KL
    coefficient beta."""

    policy: TrainState
    ema_params: Any
    kl_coef: Array


@struct.dataclass
class PPOState:
    """Policy and value networks (each with its own optimiser), the EMA of the policy's
    weights, and the KL coefficient beta (changes only with the adaptive controller)."""

    policy: TrainState
    value: TrainState
    ema_params: Any
    kl_coef: Array
