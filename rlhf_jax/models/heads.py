"""Heads on the shared :class:`Decoder`: next-token logits, or one scalar per token.

Both keep the decoder under the parameter name ``backbone``, so a reward or value model
starts from an SFT export by copying ``params['backbone']``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.transformer import Decoder, KVCache, dense
from rlhf_jax.models.vocab import mask_padded_logits


class LanguageModel(nn.Module):
    """Returns (logits ``[B, T - logits_from, Vp] f32``, cache). ``Vp`` is
    ``cfg.padded_vocab_size``; the logits of ids ``>= cfg.vocab_size`` are
    ``models.vocab.MASKED_LOGIT`` (probability 0).

    ``logits_from`` (a static int, default 0) is the first position whose logits are
    computed: PPO's passes need only the response's and the sampler's prefill only the last
    prompt position's, and at a real vocabulary the unembedding of every prompt position is
    a large share of a forward pass. ``right_padded`` (static, default False): see
    :meth:`~rlhf_jax.models.Decoder.__call__`.
    """

    cfg: ModelConfig
    dropout_rate: float = 0.0  # while training: each stage sets its own (e.g. sft.dropout)

    def setup(self):
        self.backbone = Decoder(self.cfg, self.dropout_rate)
        if not self.cfg.tie_embeddings:
            self.lm_head = dense(self.cfg.padded_vocab_size, ("embed",), ("vocab",), self.cfg, None, False)

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 deterministic: bool = True, logits_from: int = 0, right_padded: bool = False):
        hidden, cache = self.hidden(tokens, positions, segment_ids, cache, deterministic, logits_from, right_padded)
        return self.logits(hidden), cache

    def hidden(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
               deterministic: bool = True, hidden_from: int = 0, right_padded: bool = False):
        """(final hidden states ``[B, T - hidden_from, E]`` in the compute dtype, cache): the
        input of :meth:`logits`. Losses over the vocabulary take these and unembed them a
        chunk at a time (``rlhf_jax.lm_terms``), never holding all ``[B, T, V]`` logits."""
        hidden, cache = self.backbone(tokens, positions, segment_ids, cache, deterministic, right_padded)
        return hidden[:, hidden_from:], cache

    def logits(self, hidden):
        """``[B, T, E]`` hidden states -> ``[B, T, Vp] f32`` logits, padded ids masked."""
        if self.cfg.tie_embeddings:
            logits = self.backbone.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        # padded ids (model.vocab_pad_multiple) get probability 0; a no-op without padding
        return mask_padded_logits(logits.astype(jnp.float32), self.cfg.vocab_size)


class ScalarModel(nn.Module):
    """The decoder with the unembedding replaced by a scalar head (reward or value).

    Returns (scalars ``[B, T] f32``: one per position, cache). The head's ``bias`` is the
    reward offset the RM stage sets so that demonstrations score mean 0.
    """

    cfg: ModelConfig
    dropout_rate: float = 0.0  # while training: each stage sets its own (e.g. rm.dropout)

    def setup(self):
        self.backbone = Decoder(self.cfg, self.dropout_rate)
        self.head = nn.Dense(
            1, dtype=jnp.float32, param_dtype=jnp.dtype(self.cfg.param_dtype),
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "scalar")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("scalar",)))

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 deterministic: bool = True, right_padded: bool = False):
        hidden, cache = self.backbone(tokens, positions, segment_ids, cache, deterministic, right_padded)
        return self.head(hidden.astype(jnp.float32))[..., 0], cache


def normalize_scalar_head(params, offset: float, gain: float = 1.0):
    """Params of a :class:`ScalarModel` whose output is ``(raw - offset) * gain``: the
    head's bias absorbs the offset, kernel and bias take the gain."""
    head = params["head"]
    new_head = {"kernel": head["kernel"] * gain, "bias": (head["bias"] - offset) * gain}
    return dict(params, head=new_head)
