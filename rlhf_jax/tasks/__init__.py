"""The embedded synthetic instruction task: small enough for a tiny transformer on a CPU,
rich enough that alignment matters, and built so that, as in InstructGPT, judging a
response is easier than writing it.

Eight instruction families (copy, reverse, sort, omit, count, repeat, first, last), each with
several phrasings, over a closed vocabulary of ~160 words. A prompt reads
``[politely] HEAD : ITEMS [, CONSTRAINT] =>`` and ends where the response starts::

    politely sort from high to low : 3 12 5 , in brackets =>     ( 12 5 3 )

- :func:`gold_score` grades any response in [0, 1] over the paper's labeling criteria
  (:mod:`~rlhf_jax.tasks.gold`): content correctness, the explicit constraint,
  closed-domain hallucination, offensive words, rambling; :func:`flaw_rates` gives the
  paper's metadata rates over a set of responses.
- The pretraining "internet" carries every flaw at stated rates
  (:data:`~rlhf_jax.tasks.internet.INTERNET`); demonstrations are clean; the ``last``
  family appears only in pretraining text (held out, ``prompts_heldout``).
- :class:`NoisyLabeler` ranks K responses like a human labeler who agrees with another on
  about 73% of pairs (Plackett-Luce on gold scores, :data:`DEFAULT_TEMPERATURE`).
- :func:`write_task_files` writes demonstrations, PPO prompts, held-out prompts,
  pretraining text (JSONL) and a word-level HF tokenizer (``<pad>`` = 0), idempotently.

Modules: ``vocab`` (the words), ``instructions`` (families: the content), ``prompts``
(constraints, respect, parsing), ``gold`` (the scorer), ``internet`` (flaws),
``labeler``, ``tokenizer``, ``corpus`` (splits), ``files`` (writing).
"""

from rlhf_jax.tasks.corpus import HELD_OUT_FAMILIES, MAX_TEXT_TOKENS, make_splits
from rlhf_jax.tasks.files import SPLITS, task_info, write_task_files
from rlhf_jax.tasks.gold import FLAWS, WEIGHTS, Assessment, assess, flaw_rates, gold_score, gold_scores
from rlhf_jax.tasks.instructions import FAMILIES, Instance
from rlhf_jax.tasks.internet import INTERNET, FlawRates, flawed_response, sample_responses
from rlhf_jax.tasks.labeler import (DEFAULT_TEMPERATURE, NoisyLabeler, gold_ranks, labeler_agreement,
                                    labeler_gold_accuracy, pairwise_agreement,
                                    plackett_luce_ranks)
from rlhf_jax.tasks.prompts import (MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS, Constraint, Request,
                                    family_of, generate_prompt, parse, solve, task_prompt)
from rlhf_jax.tasks.tokenizer import build_tokenizer, save_tokenizer
from rlhf_jax.tasks.vocab import EOS, PAD, SEPARATOR, VOCAB, VOCAB_SIZE

__all__ = [
    "DEFAULT_TEMPERATURE", "EOS", "FAMILIES", "FLAWS", "HELD_OUT_FAMILIES", "INTERNET", "WEIGHTS",
    "Assessment", "Constraint", "FlawRates", "Instance", "MAX_PROMPT_TOKENS", "MAX_RESPONSE_TOKENS",
    "MAX_TEXT_TOKENS", "NoisyLabeler", "PAD", "Request", "SEPARATOR", "SPLITS", "VOCAB", "VOCAB_SIZE",
    "assess", "build_tokenizer", "family_of", "flaw_rates", "flawed_response", "generate_prompt",
    "gold_ranks", "gold_score", "gold_scores", "labeler_agreement", "labeler_gold_accuracy",
    "make_splits", "pairwise_agreement", "parse", "plackett_luce_ranks",
    "sample_responses", "save_tokenizer", "solve", "task_info", "task_prompt", "write_task_files",
]
