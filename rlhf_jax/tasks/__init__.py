"""The embedded synthetic instruction task: small enough for a tiny transformer on a CPU,
rich enough that alignment matters.

Eight instruction families (copy, reverse, sort, omit, count, repeat, first, last), each with
several phrasings, over a closed vocabulary of 150 words. A prompt reads
``[please] HEAD : ITEMS =>`` and ends where the response starts::

    sort from high to low : 3 12 5 =>     12 5 3

- :func:`gold_score` grades any response in [0, 1] with partial credit (edit distance to
  the answer the prompt determines); it is the ground truth evaluation reports.
- :class:`NoisyLabeler` ranks K responses like a human labeler who agrees with another on
  about 73% of pairs (Plackett-Luce on gold scores, :data:`DEFAULT_TEMPERATURE`).
- :func:`write_task_files` writes demonstrations, PPO prompts, held-out prompts,
  pretraining text (JSONL) and a word-level HF tokenizer (``<pad>`` = 0), idempotently.

Modules: ``vocab`` (the words), ``instructions`` (families, parsing, gold score,
corruption), ``labeler``, ``tokenizer``, ``corpus`` (splits), ``files`` (writing).
"""

from rlhf_jax.tasks.corpus import MAX_TEXT_TOKENS, make_splits
from rlhf_jax.tasks.files import SPLITS, read_jsonl, task_info, write_task_files
from rlhf_jax.tasks.instructions import (FAMILIES, MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS,
                                         Instance, corrupt, family_of, generate_prompt,
                                         gold_score, gold_scores, parse, sample_responses,
                                         solve)
from rlhf_jax.tasks.labeler import (DEFAULT_TEMPERATURE, NoisyLabeler, labeler_agreement,
                                    labeler_gold_accuracy, pairwise_agreement,
                                    plackett_luce_ranks)
from rlhf_jax.tasks.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from rlhf_jax.tasks.vocab import EOS, PAD, SEPARATOR, VOCAB, VOCAB_SIZE

__all__ = [
    "DEFAULT_TEMPERATURE", "EOS", "FAMILIES", "Instance", "MAX_PROMPT_TOKENS",
    "MAX_RESPONSE_TOKENS", "MAX_TEXT_TOKENS", "NoisyLabeler", "PAD", "SEPARATOR", "SPLITS",
    "VOCAB", "VOCAB_SIZE", "build_tokenizer", "corrupt", "family_of", "generate_prompt",
    "gold_score", "gold_scores", "labeler_agreement", "labeler_gold_accuracy",
    "load_tokenizer", "make_splits", "pairwise_agreement", "parse", "plackett_luce_ranks",
    "read_jsonl", "sample_responses", "save_tokenizer", "solve", "task_info",
    "write_task_files",
]
