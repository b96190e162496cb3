"""What a language model says about given tokens (next-token log-probs, top-1 hits,
entropies), computed from its hidden states a chunk of positions at a time, so that no
program holds more than one chunk of ``[B, chunk, V]`` f32 logits
(:func:`rlhf_jax.losses.chunked_next_token_terms` does the maths).

The chunk is as long as ``model.logits_chunk_bytes`` allows on one device: the rows and
vocabulary a device holds follow from the mesh and logical-axis rules in scope
(``rlhf_jax.sharding.activate``). When all logits fit (every CPU run of the embedded
default), there is one chunk and the computation is the unchunked one.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from rlhf_jax import losses
from rlhf_jax.config import ModelConfig
from rlhf_jax.models import LanguageModel

F32_BYTES = 4


def _parts(logical: str) -> int:
    """How many shards the mesh in scope splits the logical axis ``logical`` into."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((logical,))[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logits_chunk(cfg: ModelConfig, rows: int, length: int) -> int:
    """Positions per chunk of a ``[rows, length]`` pass: all of them when one device's f32
    logits fit ``cfg.logits_chunk_bytes``, else the fewest equal chunks that do (at least
    one position a chunk, whatever the budget)."""
    per_position = -(-rows // _parts("batch")) * -(-cfg.padded_vocab_size // _parts("vocab")) * F32_BYTES
    longest = max(1, cfg.logits_chunk_bytes // per_position)
    if longest >= length:
        return length
    return -(-length // -(-length // longest))  # n = ceil(length / longest) chunks of ceil(length / n)


def next_token_terms(model: LanguageModel, params: Any, tokens, positions, segment_ids, *, start: int = 0,
                     temperature: float = 1.0, with_entropy: bool = False, rngs: dict | None = None,
                     right_padded: bool = False) -> losses.TokenTerms:
    """:class:`~rlhf_jax.losses.TokenTerms` ``[B, T - start - 1]`` of each token after
    position ``start`` (tokens, positions, segment_ids ``[B, T]``), under the model's
    distribution at ``temperature`` (0 reads as 1: greedy sampling's log-probs are the
    model's own). ``rngs`` enables dropout; ``right_padded`` as in ``LanguageModel``."""
    kwargs = {} if rngs is None else {"deterministic": False, "rngs": rngs}
    hidden, _ = model.apply({"params": params}, tokens, positions, segment_ids, hidden_from=start,
                            right_padded=right_padded, method=LanguageModel.hidden, **kwargs)

    def unembed(h):
        return model.apply({"params": params}, h, method=LanguageModel.logits)

    chunk = logits_chunk(model.cfg, hidden.shape[0], hidden.shape[1])
    return losses.chunked_next_token_terms(hidden, unembed, tokens[:, start:], chunk, temperature or 1.0,
                                           with_entropy)
