"""Decoder-only transformers (GPT-2 and Llama families) and their heads."""

from rlhf_jax.models.heads import LanguageModel, ScalarModel
from rlhf_jax.models.stacking import is_stacked, stack_layers, unstack_layers
from rlhf_jax.models.transformer import Decoder, KVCache, positions_from_segments

__all__ = ["Decoder", "KVCache", "LanguageModel", "ScalarModel", "is_stacked", "positions_from_segments",
           "stack_layers", "unstack_layers"]
