"""The embedded task as chat conversations in TRL's conversational layout, for running it
on a chat model: ``rlhf-jax data task-conversations --out DIR``, then
``rlhf-jax data convert --format trl`` reads the files back.

Files (each prompt one user message, each reply one assistant message):

- ``train_sft.jsonl`` / ``val_sft.jsonl``: prompt-completion ``{"prompt", "completion"}``,
  the task's demonstrations (``demonstrations`` / ``demonstrations_val``);
- ``train_prefs.jsonl`` / ``val_prefs.jsonl``: preference ``{"prompt", "chosen", "rejected"}``,
  two responses per prompt of ``prompts`` / ``prompts_val`` drawn as a half-trained policy
  writes them (:func:`~rlhf_jax.tasks.internet.sample_responses`) and ordered by the task's
  noisy labeler (:class:`~rlhf_jax.tasks.NoisyLabeler`); a tie has no TRL form and is left out;
- ``train_prompts.jsonl`` / ``val_prompts.jsonl``: prompt-only ``{"prompt"}`` (PPO's).

The prompts and demonstrations are those :func:`~rlhf_jax.tasks.write_task_files` writes
with the same arguments. Same arguments, same bytes.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from rlhf_jax.atomic import write_jsonl
from rlhf_jax.tasks.corpus import make_splits
from rlhf_jax.tasks.internet import sample_responses
from rlhf_jax.tasks.labeler import DEFAULT_TEMPERATURE, NoisyLabeler

FILES: tuple[str, ...] = ("train_sft", "val_sft", "train_prefs", "val_prefs", "train_prompts", "val_prompts")


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def preference_pairs(prompts: list[str], rng: np.random.Generator, labeler: NoisyLabeler) -> list[dict]:
    """One TRL preference record per prompt whose two sampled responses the labeler orders."""
    out = []
    for prompt in prompts:
        responses = sample_responses(prompt, 2, rng)
        ranks = labeler.rank(prompt, responses)
        if ranks[0] != ranks[1]:
            chosen, rejected = responses if ranks[0] < ranks[1] else responses[::-1]
            out.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    return out


def write_task_conversations(out_dir: str | pathlib.Path, seed: int = 0, n_demonstrations: int = 2000,
                             n_demonstrations_val: int = 200, n_prompts: int = 4000, n_prompts_val: int = 200,
                             n_comparisons: int = 2000, n_comparisons_val: int = 200,
                             labeler_temperature: float = DEFAULT_TEMPERATURE,
                             overwrite: bool = False) -> dict[str, pathlib.Path]:
    """Writes :data:`FILES` into ``out_dir`` (created if needed) and returns their paths.

    Comparisons use the first ``n_comparisons`` (``n_comparisons_val``) prompts of the PPO
    prompts (validation prompts), as the pipeline collects them. Refuses a non-empty
    ``out_dir`` unless ``overwrite`` (which replaces only these files).
    """
    out_dir = pathlib.Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"--out {out_dir} is not empty; pass --overwrite to replace the task's files there")
    if n_comparisons > n_prompts or n_comparisons_val > n_prompts_val:
        raise ValueError(f"n_comparisons={n_comparisons}, n_comparisons_val={n_comparisons_val}: at most one "
                         f"comparison per prompt ({n_prompts}, {n_prompts_val} prompts)")
    splits = make_splits(seed=seed, n_demonstrations=n_demonstrations, n_demonstrations_val=n_demonstrations_val,
                         n_prompts=n_prompts, n_prompts_val=n_prompts_val, n_pretrain=0, n_pretrain_val=0)
    rng = np.random.default_rng([seed, 100])  # apart from the splits' generators ([seed, 0..6])
    labeler = NoisyLabeler(labeler_temperature, seed=seed)
    records = {}
    for name, demos, prompts, n in (("train", "demonstrations", "prompts", n_comparisons),
                                    ("val", "demonstrations_val", "prompts_val", n_comparisons_val)):
        texts = [r["prompt"] for r in splits[prompts]]
        records[f"{name}_sft"] = [{"prompt": _user(d["prompt"]), "completion": _assistant(d["response"])}
                                  for d in splits[demos]]
        records[f"{name}_prefs"] = preference_pairs(texts[:n], rng, labeler)
        records[f"{name}_prompts"] = [{"prompt": _user(p)} for p in texts]
    out_dir.mkdir(parents=True, exist_ok=True)
    encode = lambda record: json.dumps(record, ensure_ascii=False)  # noqa: E731
    return {name: write_jsonl(out_dir / f"{name}.jsonl", records[name], encode) for name in FILES}
