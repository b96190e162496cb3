"""Scoring a policy's episodes with a model: the logits and log-probs of the response tokens
(at the sampling temperature), a value model's estimates, and a reward model's score. Used by
PPO's experience and by the evaluator; pure functions of (model, params, arrays).

Response positions: with prompts of length P, the logits at positions ``P-1 .. L-2``
predict the response tokens at ``P .. L-1``; values are read at the same positions (the
state before each response token).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from rlhf_jax import lm_terms, losses
from rlhf_jax.sampling import Samples
from rlhf_jax.steps import last_token_scores


def response_logits(model: nn.Module, params: Any, tokens, segment_ids, positions, prompt_len: int):
    """``[B, N+1, V]``: logits from the last prompt position on (the last row is unused)."""
    logits, _ = model.apply({"params": params}, tokens, positions, segment_ids, logits_from=prompt_len - 1)
    return logits


def tempered(logits, temperature: float):
    """Logits of the sampling distribution at ``temperature`` (0, greedy: as they are)."""
    return logits / (1.0 if temperature == 0.0 else temperature)


def response_logprobs(logits, tokens, prompt_len: int, temperature: float):
    """``[B, N]`` log-probs of the response tokens under the sampling distribution at
    ``temperature``, from :func:`response_logits`' output."""
    return losses.next_token_logprobs(tempered(logits, temperature), tokens[:, prompt_len - 1:])


def response_terms(model: nn.Module, params: Any, tokens, segment_ids, positions, prompt_len: int,
                   temperature: float, with_entropy: bool = False) -> losses.TokenTerms:
    """``[B, N]`` log-probs (and top-1 hits, entropies) of the response tokens under the
    sampling distribution at ``temperature``, a chunk of logits at a time (``rlhf_jax.lm_terms``):
    what :func:`response_logprobs` computes from all of :func:`response_logits` at once."""
    return lm_terms.next_token_terms(model, params, tokens, positions, segment_ids, start=prompt_len - 1,
                                     temperature=temperature, with_entropy=with_entropy)


def response_values(model: nn.Module, params: Any, tokens, segment_ids, positions, prompt_len: int):
    """``[B, N]``: the value model's estimate before each response token."""
    values, _ = model.apply({"params": params}, tokens, positions, segment_ids)
    return values[:, prompt_len - 1:-1]


RewardFn = Callable[[Any, Samples], jax.Array]  # (reward params, samples) -> [B] f32 scores


def reward_model_score(reward_model: nn.Module) -> RewardFn:
    """The reward model's output at each episode's last real token (prompt + response)."""

    def score(params, samples: Samples):
        tokens, segments, positions = samples.full_sequences()
        return last_token_scores(reward_model, params, tokens, segments, positions)

    return score


def gold_reward(tokenizer) -> RewardFn:
    """The embedded task's gold scorer as a reward: each episode's prompt (a conversation
    when the chat template rendered one: the scorer reads its user message) and response are
    decoded on the host (``jax.pure_callback``) and scored. Rows with no prompt (batch
    padding) score 0. Single-process runs only: the callback sees the whole batch on one
    host."""
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.tasks import gold_score

    def host_scores(prompt_tokens, prompt_segments, tokens, mask, ended) -> np.ndarray:
        scores = np.zeros(tokens.shape[0], np.float32)
        for i in range(tokens.shape[0]):
            # a conversation the chat template rendered: the gold scorer reads its user message
            prompt = tokenizer.decode_prompt(prompt_tokens[i][prompt_segments[i] > 0].tolist())
            if prompt_segments[i].any():
                scores[i] = gold_score(prompt, tokenizer.decode(tokens[i][mask[i]].tolist()), bool(ended[i]))
        return scores

    def score(params, samples: Samples) -> jax.Array:
        del params  # nothing to learn: the scorer is exact
        return jax.pure_callback(host_scores, jax.ShapeDtypeStruct(samples.tokens.shape[:1], jnp.float32),
                                 samples.prompt_tokens, samples.prompt_segments, samples.tokens, samples.mask,
                                 samples.ended)

    return score
