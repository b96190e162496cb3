"""Best-of-n, an inference-time policy: for every held-out prompt (``generation.prompts``),
``best_of_n.n`` responses sampled from ``best_of_n.policy_init`` with the generation
settings, scored by ``best_of_n.reward_init`` (a reward model, or the gold scorer), the
highest kept. Writes ``<stage>/responses.jsonl`` (each prompt, its pick and score, every
candidate with its score) and the mean scores in ``metrics.jsonl``. Nothing is trained; a
finished stage is not run again."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from rlhf_jax import parameters, provenance
from rlhf_jax.atomic import write_jsonl, write_text
from rlhf_jax.config import Config, ConfigError
from rlhf_jax.data import PromptBatches
from rlhf_jax.evaluation import PolicyEvaluator, best_of_n_picks, sample_draws
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.models import LanguageModel
from rlhf_jax.stages import common
from rlhf_jax.stages.online import Reward, load_reward
from rlhf_jax.stages.table import RunOptions

RESPONSES = "responses.jsonl"


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path:
    """Writes ``<workdir>/<stage>/responses.jsonl``; returns the stage directory."""
    b, gen, stage = cfg.best_of_n, cfg.generation, options.stage or "best_of_n"
    env = common.make_env(cfg, workdir, stage)
    reward_block = b if options.reward_fn is None else dataclasses.replace(b, reward_init=None)
    env.inputs = provenance.stage_inputs(env, "best_of_n", reward_block, ("generation.sampling", gen.sampling),
                                         ("generation.prompts", gen.prompts))
    if (env.stage_dir / RESPONSES).exists():  # written by an earlier run: of the same inputs, or refused
        provenance.check_same(provenance.read_inputs_file(env.stage_dir), env.inputs, env.stage_dir, env.stage_dir)
        return env.stage_dir
    if not gen.prompts.val_path:
        raise ConfigError("best-of-n answers generation.prompts.val_path, which is None")
    if gen.sampling.temperature == 0 and b.n > 1:
        raise ConfigError(f"best_of_n.n={b.n} needs sampling: generation.sampling.temperature is 0 (greedy), "
                          "so every draw would be the same response")
    if parameters.source(b.policy_init, "best_of_n.policy_init", env.workdir).scalar:
        raise ConfigError(f"best_of_n.policy_init={b.policy_init!r}: a reward-model export, not a policy")
    prompts = env.batches(PromptBatches, gen.prompts.val_path, "generation.prompts.val_path",
                          dataclasses.replace(gen.prompts, shuffle=False))
    policy = LanguageModel(cfg.model)
    params, _ = env.load_params(b.policy_init, policy, "best_of_n.policy_init")
    reward = (Reward(options.reward_fn) if options.reward_fn is not None
              else load_reward(env, b.reward_init, "best_of_n.reward_init"))
    evaluator = PolicyEvaluator(policy, reward.fn, env.mesh, parameters.shardings_of(params), env.tokenizer,
                                gen.sampling, cfg.seed)
    logger = MetricsLogger(env.stage_dir, 0, b.n, stage, options.show_progress)
    done = [0]

    def progress():
        done[0] += 1
        logger.progress(done[0])

    draws = sample_draws(evaluator, params, reward.params, prompts, b.n, progress)
    (picked, chosen), = best_of_n_picks(draws, b.n)
    logger.log(b.n, {"best_of_n/score": float(picked.scores.mean()),
                     "best_of_n/sample_score": float(np.mean([d.scores.mean() for d in draws]))})
    logger.close()
    rows = [{"prompt": picked.prompts[i], "response": picked.responses[i], "score": float(picked.scores[i]),
             "chosen": int(chosen[i]), "responses": [d.responses[i] for d in draws],
             "scores": [float(d.scores[i]) for d in draws]} for i in range(len(picked.prompts))]
    if jax.process_index() == 0:  # the inputs first: the responses file says the stage is done
        write_text(env.stage_dir / provenance.INPUTS_FILE, json.dumps(env.inputs, indent=1, sort_keys=True))
        write_jsonl(env.stage_dir / RESPONSES, rows)
    return env.stage_dir
