"""Between SFT and the RM: collect comparisons. Sample K responses per prompt from one or
more policies (InstructGPT compared outputs of several models) and have a labeler rank them; write ``comparisons/train.jsonl`` and ``val.jsonl``
(``{"prompt", "responses", "ranks"}``, 0 = best, equal = tie).

A labeler is anything with ``rank(prompt, responses) -> ranks``: the embedded task's noisy
labeler, or (``comparisons.labeler = <path>``) the JSONL a human labelling tool exported,
which is validated and used as it is.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Protocol, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import provenance
from rlhf_jax.atomic import write_jsonl, write_text
from rlhf_jax.config import Config, ConfigError
from rlhf_jax.data import PromptBatches, read_records, to_global
from rlhf_jax.data.chat import Prompt, is_conversation
from rlhf_jax.models import LanguageModel
from rlhf_jax.sampling import make_sampler
from rlhf_jax.stages import common
from rlhf_jax.stages.table import RunOptions


class Labeler(Protocol):
    """``prompt`` is text, or a conversation (a message list) when the prompts file holds one."""

    def rank(self, prompt: Prompt, responses: Sequence[str]) -> list[int]: ...


def task_labeler(cfg: Config) -> Labeler:
    from rlhf_jax.tasks import DEFAULT_TEMPERATURE, NoisyLabeler

    temperature = cfg.comparisons.labeler_temperature
    return NoisyLabeler(DEFAULT_TEMPERATURE if temperature is None else temperature, seed=cfg.seed)


def collected(stage_dir: pathlib.Path) -> bool:
    """Whether the comparisons in ``stage_dir`` are written (both files go in at the end)."""
    return (stage_dir / "train.jsonl").exists() and (stage_dir / "val.jsonl").exists()


def run_comparisons(cfg: Config, workdir: str | pathlib.Path, labeler: Labeler | None = None,
                    show_progress: bool = True) -> pathlib.Path:
    """Writes ``<workdir>/comparisons/{train,val}.jsonl``; returns that directory."""
    c = cfg.comparisons
    env = common.make_env(cfg, workdir, "comparisons")
    out_dir = env.stage_dir
    # a labeler's file is used as it is: no policy is read then
    env.inputs = provenance.stage_inputs(env, "comparisons", c if c.labeler == "task" else
                                         dataclasses.replace(c, policies=()))
    if collected(out_dir):  # collected by an earlier run: of the same inputs, or refused
        provenance.check_same(provenance.read_inputs_file(out_dir), env.inputs, out_dir, out_dir)
        return out_dir
    if not 2 <= c.k_min <= c.k_max <= 9:
        raise ConfigError(f"comparisons.k_min={c.k_min}, k_max={c.k_max}: need 2 <= k_min <= k_max <= 9")
    if c.labeler != "task":
        records = [r for _, r in read_records(env.resolve(c.labeler), "comparisons")]  # validates
        out_dir.mkdir(parents=True, exist_ok=True)
        return _split_and_write(records, c.val_fraction, cfg.seed, out_dir, env.inputs)
    labeler = labeler or task_labeler(cfg)

    prompts = env.batches(PromptBatches, c.prompts.train_path, "comparisons.prompts.train_path",
                          dataclasses.replace(c.prompts, shuffle=True),
                          ).require_one_batch("comparisons.prompts.batch_size")
    model = LanguageModel(cfg.model)
    policies = []
    for spec in c.policies:
        params, _ = env.load_params(spec, model, "comparisons.policies")
        policies.append((params, make_sampler(model, c.sampling, env.mesh, jax.tree.map(lambda x: x.sharding, params),
                                              env.tokenizer.eos_id, env.tokenizer.pad_id)))
    per_policy = -(-c.k_max // len(policies))  # responses each policy contributes per prompt
    rng = np.random.default_rng(cfg.seed)
    n_batches = min(-(-c.n_prompts // prompts.global_batch_size), prompts.steps_per_epoch)
    records = []
    progress = _progress(n_batches, show_progress)
    for step in range(n_batches):
        local = prompts.get(step)
        # every prompt per_policy times in one sampling call per policy
        tiled = to_global(jax.tree.map(lambda x: np.repeat(x, per_policy, axis=0), local), env.mesh)
        responses = []  # per policy: [B * per_policy] decoded responses
        for j, (params, sampler) in enumerate(policies):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step), j)
            # every process sees the whole batch, so all build the same records; process 0 writes
            samples = multihost_utils.process_allgather(sampler(params, tiled.tokens, tiled.segment_ids, key),
                                                        tiled=True)
            responses.append([env.tokenizer.decode(t[m]) for t, m in zip(samples.tokens, samples.mask)])
        tokens, segments = multihost_utils.process_allgather((local.tokens, local.segment_ids), tiled=True)
        given = prompts.global_prompts(step)
        for i in range(tokens.shape[0]):
            # a conversation is recorded as given (its rendering cannot be decoded back into
            # messages); text as the policy saw it
            prompt = given[i] if is_conversation(given[i]) else env.tokenizer.decode(tokens[i][segments[i] > 0])
            k = int(rng.integers(c.k_min, c.k_max + 1))
            # interleave the policies: response r comes from policy r % len(policies)
            candidates = [responses[r % len(policies)][i * per_policy + r // len(policies)] for r in range(k)]
            records.append({"prompt": prompt, "responses": candidates, "ranks": labeler.rank(prompt, candidates)})
        progress.update(1)
    progress.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    return _split_and_write(records[:c.n_prompts], c.val_fraction, cfg.seed, out_dir, env.inputs)


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path:
    """The stage table's comparisons (the embedded task's labeler, or ``comparisons.labeler``)."""
    return run_comparisons(cfg, workdir, show_progress=options.show_progress)


def _split_and_write(records: list[dict], val_fraction: float, seed: int, out_dir: pathlib.Path,
                     inputs: dict) -> pathlib.Path:
    """Writes the files, their inputs first (``collected`` looks for both files)."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, int(round(val_fraction * len(records))))
    if jax.process_index() == 0:
        write_text(out_dir / provenance.INPUTS_FILE, json.dumps(inputs, indent=1, sort_keys=True))
        write_jsonl(out_dir / "val.jsonl", [records[i] for i in order[:n_val]])
        write_jsonl(out_dir / "train.jsonl", [records[i] for i in order[n_val:]])
    if jax.process_count() > 1:  # no process goes on to read them before they exist
        multihost_utils.sync_global_devices("rlhf_jax comparisons written")
    return out_dir


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="comparisons", disable=not show or jax.process_index() != 0)
