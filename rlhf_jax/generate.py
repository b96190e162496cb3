"""``rlhf-jax sample``: responses from any exported policy, with the run's sampling settings."""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Sequence

import jax
from jax.experimental import multihost_utils

from rlhf_jax import parameters
from rlhf_jax.config import Config, ConfigError
from rlhf_jax.data import PromptBatches, to_global
from rlhf_jax.data.chat import Prompt, is_conversation, user_message
from rlhf_jax.data.tokenizer import prompt_ids
from rlhf_jax.models import LanguageModel
from rlhf_jax.sampling import make_sampler
from rlhf_jax.stages import common


def generate_from_export(cfg: Config, workdir: str | pathlib.Path, export: str, prompts: Sequence[Prompt],
                         chat_prompts: bool = False) -> list[tuple[Prompt, str]]:
    """(prompt, response) for each prompt (default: the first held-out prompts,
    ``generation.prompts``), sampled with ``generation.sampling`` from the params in ``export``.
    A prompt is text or a conversation; ``chat_prompts``: a text prompt is sent as one user
    message when the tokenizer renders a chat template (what someone typing to a chat model
    means). Returned prompts are conversations as given, text as the policy saw it (decoded)."""
    env = common.make_env(cfg, workdir, "sample")
    if parameters.source(export, "--export", env.workdir).scalar:
        raise ConfigError(f"--export {export}: a reward-model export, not a policy")
    model = LanguageModel(cfg.model)
    params, _ = env.load_params(export, model, "--export")
    gen = cfg.generation
    with tempfile.TemporaryDirectory() as tmp:
        if prompts:
            if chat_prompts and env.tokenizer.uses_chat_template:
                prompts = [user_message(p) if isinstance(p, str) else p for p in prompts]
            for i, prompt in enumerate(prompts, 1):  # checked here, so no error names the temporary file
                if not len(prompt_ids(env.tokenizer, prompt)):
                    raise ConfigError(f"--prompt number {i} ({prompt!r}) encodes to no tokens; the sampler needs "
                                      "one to start from")
            path = pathlib.Path(tmp) / "prompts.jsonl"
            path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        else:
            path = env.data_path(gen.prompts.val_path or gen.prompts.train_path, "generation.prompts.val_path")
        batches = PromptBatches(str(path), env.tokenizer, gen.prompts, seed=cfg.seed,
                                cache_dir=str(pathlib.Path(tmp) / "cache"), **env.process)
        sampler = make_sampler(model, gen.sampling, env.mesh, jax.tree.map(lambda x: x.sharding, params),
                               env.tokenizer.eos_id, env.tokenizer.pad_id)
        out = []
        for i, local in enumerate(batches.eval_batches()):
            batch = to_global(local, env.mesh)
            samples = sampler(params, batch.tokens, batch.segment_ids, jax.random.PRNGKey(cfg.seed + i))
            # the whole batch on every process (device_get cannot fetch other hosts' rows)
            samples, tokens, segments = multihost_utils.process_allgather(
                (samples, local.tokens, local.segment_ids), tiled=True)
            for row in range(tokens.shape[0]):
                if segments[row].any():  # real rows come in file order, padding after them
                    given = batches.prompts[len(out)]
                    prompt = given if is_conversation(given) else env.tokenizer.decode(tokens[row][segments[row] > 0])
                    out.append((prompt, env.tokenizer.decode(samples.tokens[row][samples.mask[row]])))
        return out if prompts else out[:8]
