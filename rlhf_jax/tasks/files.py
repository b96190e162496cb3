"""Writes the embedded task to disk: JSONL splits, the tokenizer and a manifest.

Idempotent: ``task.json`` records the settings the files were made with and is written
last, so a directory whose manifest matches the request is complete and is left alone;
any other state is (re)written. Every file is written under a temporary name and renamed,
so a reader never sees half a file, and two processes writing the same settings at once
write identical bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Sequence

from rlhf_jax.atomic import write_jsonl, write_text
from rlhf_jax.tasks import vocab as V
from rlhf_jax.tasks.corpus import HELD_OUT_FAMILIES, MAX_TEXT_TOKENS, make_splits
from rlhf_jax.tasks.instructions import FAMILIES
from rlhf_jax.tasks.internet import INTERNET, MAX_FLAWED_RESPONSE_TOKENS, FlawRates
from rlhf_jax.tasks.prompts import MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS
from rlhf_jax.tasks.tokenizer import save_tokenizer

# Bump when generation changes, so directories written by older code are regenerated.
FORMAT_VERSION = 3
SPLITS: tuple[str, ...] = ("demonstrations", "demonstrations_val", "prompts", "prompts_val",
                           "prompts_heldout", "pretrain", "pretrain_val")
MANIFEST = "task.json"


def task_info() -> dict:
    """Sizes a model and data pipeline need: ``vocab_size``, ``max_prompt_tokens``,
    ``max_response_tokens`` (a correct response), ``max_flawed_response_tokens`` (the
    internet's; none of these counts ``<eos>``) and ``max_text_tokens`` (pretraining
    texts). Lengths are in tokens of the task tokenizer (one token per word)."""
    return {"vocab_size": V.VOCAB_SIZE, "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_response_tokens": MAX_RESPONSE_TOKENS,
            "max_flawed_response_tokens": MAX_FLAWED_RESPONSE_TOKENS, "max_text_tokens": MAX_TEXT_TOKENS,
            "pad_id": 0, "eos_id": V.VOCAB.index(V.EOS), "families": list(FAMILIES)}


def _paths(out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {name: out_dir / f"{name}.jsonl" for name in SPLITS}
    paths["tokenizer"] = out_dir / "tokenizer"
    paths["manifest"] = out_dir / MANIFEST
    return paths


def _write_tokenizer(target: pathlib.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tokenizer.") as tmp:
        save_tokenizer(tmp)
        for f in sorted(pathlib.Path(tmp).iterdir()):
            os.replace(f, target / f.name)


def _is_complete(paths: dict[str, pathlib.Path], manifest: dict) -> bool:
    try:
        current = json.loads(paths["manifest"].read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files_there = all(paths[n].is_file() for n in SPLITS)
    return current == manifest and files_there and (paths["tokenizer"] / "tokenizer.json").is_file()


def write_task_files(out_dir: str | pathlib.Path, seed: int = 0, n_demonstrations: int = 2000,
                     n_demonstrations_val: int = 200, n_prompts: int = 4000,
                     n_prompts_val: int = 200, n_prompts_heldout: int = 200,
                     n_pretrain: int = 20000, n_pretrain_val: int = 1000, demo_noise: float = 0.1,
                     pretrain_pair_fraction: float = 0.5, internet: FlawRates = INTERNET,
                     families: Sequence[str] = FAMILIES,
                     held_out_families: Sequence[str] = HELD_OUT_FAMILIES) -> dict[str, pathlib.Path]:
    """Writes the task into ``out_dir`` (created if needed) and returns its paths.

    Returned names: ``tokenizer`` (a ``save_pretrained`` directory), ``demonstrations`` and
    ``demonstrations_val`` (``{"prompt", "response"}``), ``prompts``, ``prompts_val`` and
    ``prompts_heldout`` (``{"prompt"}``; the last of the held-out families only),
    ``pretrain`` and ``pretrain_val`` (``{"text"}``), all JSONL, and ``manifest``
    (``task.json``: the settings plus :func:`task_info`).

    Every prompt ends with the separator ``=>``; the response starts right after it (the
    model sees ``prompt`` tokens then ``response`` tokens then ``<eos>``). Held-out
    problems (``prompts_val``, ``demonstrations_val``, ``prompts_heldout``) occur in no
    training split, and ``held_out_families`` only in pretraining text; a ``demo_noise``
    fraction of demonstrations has one wrong edit; pretraining is ``pretrain_pair_fraction``
    instruction/answer pairs (flawed at the rates ``internet``) plus plain lists, runs and
    sentences. Same arguments, same bytes; a second call with the same arguments writes
    nothing.
    """
    out_dir = pathlib.Path(out_dir)
    settings = dict(seed=seed, n_demonstrations=n_demonstrations,
                    n_demonstrations_val=n_demonstrations_val, n_prompts=n_prompts,
                    n_prompts_val=n_prompts_val, n_prompts_heldout=n_prompts_heldout,
                    n_pretrain=n_pretrain, n_pretrain_val=n_pretrain_val, demo_noise=demo_noise,
                    pretrain_pair_fraction=pretrain_pair_fraction,
                    internet=dataclasses.asdict(internet), families=list(families),
                    held_out_families=list(held_out_families))
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, **task_info()}
    # Through JSON and back, so the comparison with a manifest on disk is like for like.
    manifest = json.loads(json.dumps(manifest))
    paths = _paths(out_dir)
    if _is_complete(paths, manifest):
        return paths

    splits = make_splits(**{**settings, "internet": internet, "families": tuple(families),
                            "held_out_families": tuple(held_out_families)})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)  # incomplete until the last rename below
    for name in SPLITS:
        write_jsonl(paths[name], splits[name])
    _write_tokenizer(paths["tokenizer"])
    write_text(paths["manifest"], json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths
