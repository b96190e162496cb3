"""Decoder-only transformers (GPT-2 and Llama families) and their heads."""

from rlhf_jax.models.heads import LanguageModel, ScalarModel
from rlhf_jax.models.transformer import Decoder, KVCache, positions_from_segments

__all__ = ["Decoder", "KVCache", "LanguageModel", "ScalarModel", "positions_from_segments"]
