"""The pipeline's evaluation on the embedded task: every policy on held-out prompts, judged
by the gold scorer with the paper's metadata (Fig. 4), greedily and sampled.

For each policy (``sft``, ``sft_large`` when the RM has a larger base, each PPO run) the
report holds, per decoding (``greedy``; ``sampled``: ``pipeline.eval_samples`` draws per
prompt at PPO's training temperature) and per prompt set (the trained families; with a
``heldout_`` prefix, the families only pretraining text asks):

- ``gold_score`` and, for the PPO runs, ``win_rate_vs_sft`` (and ``win_rate_vs_sft_large``):
  per prompt and draw, ties half;
- the flaw rates of :func:`rlhf_jax.tasks.flaw_rates` (``constraint_violation``,
  ``hallucination``, ``offensive_respectful``, ``offensive``, ``rambling``) and
  ``attempts_instruction``;
- ``rm_score``, ``response_length``, ``eos_rate``; for sampled responses of the policies
  that share the SFT model's architecture, ``kl_to_sft``: the summed per-token estimate
  ``ppo.kl_estimator`` of KL(policy || SFT) at the training temperature, what PPO's
  ``ppo/kl_to_ref`` measures on training episodes.

Plus each policy's pretraining loss (the alignment tax), the RM's held-out accuracy and
best-of-n picks among SFT samples, and how far the labels agree with a second labeler and
with the gold order.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, parameters
from rlhf_jax.config import Config
from rlhf_jax.evaluation import Generations, PolicyEvaluator
from rlhf_jax.logging import read_metrics
from rlhf_jax.stages import common


def task_metrics(generations: Generations) -> dict[str, float]:
    """Gold score and metadata flaw rates of a set of generations (NaN-free keys only)."""
    from rlhf_jax.tasks import flaw_rates

    rates = flaw_rates(generations.prompts, generations.responses, generations.ended)
    return {k: v for k, v in rates.items() if np.isfinite(v)}


def gold_of(generations: Generations) -> np.ndarray:
    from rlhf_jax.tasks import gold_scores

    return gold_scores(generations.prompts, generations.responses, generations.ended)


def gold_reward(tokenizer) -> Callable:
    """A :data:`~rlhf_jax.policy.RewardFn` that is the task's gold scorer: each episode's
    prompt and response are decoded on the host (``jax.pure_callback``) and scored. Rows
    with no prompt (batch padding) score 0. Single-process runs only: the callback sees
    the whole batch on one host."""
    from rlhf_jax.tasks import gold_score

    def host_scores(prompt_tokens, prompt_segments, tokens, mask, ended) -> np.ndarray:
        scores = np.zeros(tokens.shape[0], np.float32)
        for i in range(tokens.shape[0]):
            prompt = tokenizer.decode(prompt_tokens[i][prompt_segments[i] > 0].tolist())
            if prompt.strip():
                scores[i] = gold_score(prompt, tokenizer.decode(tokens[i][mask[i]].tolist()), bool(ended[i]))
        return scores

    def score(params, samples) -> jax.Array:
        del params  # nothing to learn: the scorer is exact
        return jax.pure_callback(host_scores, jax.ShapeDtypeStruct(samples.tokens.shape[:1], jnp.float32),
                                 samples.prompt_tokens, samples.prompt_segments, samples.tokens, samples.mask,
                                 samples.ended)

    return score


def rm_best_of_n(evaluator: PolicyEvaluator, n: int, sft_params, reward_params, prompts) -> dict[str, float]:
    """The RM as a best-of-n selector among ``n`` samples of the SFT policy on the held-out
    prompts (``evaluator`` samples with PPO's settings): report keys ``best_of_n``,
    ``best_of_n_gold`` (the RM's pick), ``best_of_n_random_gold`` (one sample) and
    ``best_of_n_oracle_gold`` (the gold-best sample)."""
    rewards, gold = [], []
    for draw in range(1, n + 1):
        generations = evaluator.generate(sft_params, sft_params, reward_params, prompts, draw=draw)
        rewards.append(generations.scores)
        gold.append(gold_of(generations))
    picked, metrics = losses.best_of_n(jnp.asarray(np.stack(rewards)), jnp.asarray(np.stack(gold)))
    return {"best_of_n": n, "best_of_n_gold": float(picked),
            "best_of_n_random_gold": float(metrics["best_of_n/random_gold"]),
            "best_of_n_oracle_gold": float(metrics["best_of_n/oracle_gold"])}


def label_agreement(comparisons_dir: pathlib.Path, seed: int, temperature: float | None) -> dict[str, float]:
    """How the collected labels agree with a second, independent labeler of the same noise
    on the same responses (``inter_labeler_agreement``, the paper's 72.6%) and with the gold
    order (``labels_gold_agreement``), over pairs both order strictly."""
    from rlhf_jax.data import read_records
    from rlhf_jax.tasks import DEFAULT_TEMPERATURE, NoisyLabeler, gold_ranks, pairwise_agreement

    second = NoisyLabeler(DEFAULT_TEMPERATURE if temperature is None else temperature, seed=seed + 10_000)
    counts = np.zeros(4, np.int64)
    for name in ("train.jsonl", "val.jsonl"):
        for _, record in read_records(comparisons_dir / name, "comparisons"):
            prompt, responses, ranks = record["prompt"], record["responses"], record["ranks"]
            counts[:2] += pairwise_agreement(ranks, second.rank(prompt, responses))
            counts[2:] += pairwise_agreement(ranks, gold_ranks(prompt, responses))
    return {"inter_labeler_agreement": float(counts[0] / max(counts[1], 1)),
            "labels_gold_agreement": float(counts[2] / max(counts[3], 1))}


def _summary(generations: Generations, gold: np.ndarray, with_kl: bool) -> dict[str, float]:
    out = {**task_metrics(generations), "gold_score": float(gold.mean()),
           "rm_score": float(generations.scores.mean()), "response_length": float(generations.lengths.mean()),
           "eos_rate": float(generations.ended.mean())}
    if with_kl and generations.kl is not None:
        out["kl_to_sft"] = float(generations.kl.mean())
    return out


def evaluate(cfg: Config, workdir: pathlib.Path, ppo_names: tuple[str, ...]) -> tuple[dict[str, Any], dict]:
    """The report's evaluation (see the module docstring) and sample responses for it:
    ``{"greedy": rows, "sampled": rows}``, each row a prompt and every policy's response."""
    from rlhf_jax.data import PromptBatches, TextBatches
    from rlhf_jax.models import LanguageModel, ScalarModel
    from rlhf_jax.policy import reward_model_score

    env = common.make_env(cfg, workdir, "eval")
    ppo, pipe = cfg.ppo, cfg.pipeline

    def prompt_set(spec: str, field: str):
        return env.batches(PromptBatches, spec, field, dataclasses.replace(ppo.prompts, shuffle=False))

    prompt_sets = {"": prompt_set(ppo.prompts.val_path, "ppo.prompts.val_path")}
    if pipe.heldout_prompts:
        prompt_sets["heldout_"] = prompt_set(pipe.heldout_prompts, "pipeline.heldout_prompts")
    texts = env.batches(TextBatches, ppo.pretrain.val_path, "ppo.pretrain.val_path",
                        dataclasses.replace(ppo.pretrain, shuffle=False))
    policy = LanguageModel(cfg.model)
    scalar = ScalarModel(parameters.source("run:rm/export", "rm export", workdir).model)
    load = lambda stage, model: env.load_params(f"run:{stage}/export", model, f"{stage} export")[0]  # noqa: E731
    reward, sft = load("rm", scalar), load("sft", policy)
    decodings = {"greedy": dataclasses.replace(ppo.sampling, temperature=0.0), "sampled": ppo.sampling}

    def evaluators_for(model, params) -> dict[str, PolicyEvaluator]:
        shardings = jax.tree.map(lambda x: x.sharding, params)
        return {name: PolicyEvaluator(model, reward_model_score(scalar), env.mesh, shardings, env.tokenizer,
                                      sampling, cfg.seed, ppo.kl_estimator) for name, sampling in decodings.items()}

    report: dict[str, Any] = {"evaluation": {
        "temperature": ppo.sampling.temperature, "samples_per_prompt": pipe.eval_samples,
        "kl_estimator": ppo.kl_estimator, "prompts": prompt_sets[""].num_rows,
        **({"heldout_prompts": prompt_sets["heldout_"].num_rows} if "heldout_" in prompt_sets else {})}}
    generations: dict[tuple[str, str], Generations] = {}
    gold: dict[tuple[str, str], np.ndarray] = {}

    def measure(name: str, evaluators: dict[str, PolicyEvaluator], params, ref_params, with_kl: bool) -> None:
        report[name] = {"pretrain_loss": evaluators["greedy"].pretrain_loss(params, texts)}
        for (prefix, batches), (decoding, evaluator) in itertools.product(prompt_sets.items(), evaluators.items()):
            key = (name, prefix + decoding)
            generations[key] = (evaluator.generate(params, ref_params, reward, batches) if decoding == "greedy"
                                else evaluator.generate_draws(params, ref_params, reward, batches, pipe.eval_samples))
            gold[key] = gold_of(generations[key])
            report[name][prefix + decoding] = _summary(generations[key], gold[key], with_kl)

    small = evaluators_for(policy, sft)
    baselines = ["sft"]
    if cfg.rm.model is not None:
        large = LanguageModel(cfg.rm.model)
        large_sft = load("sft_large", large)
        # its KL would be to itself; the policies' is to the small SFT model
        measure("sft_large", evaluators_for(large, large_sft), large_sft, large_sft, with_kl=False)
        baselines.append("sft_large")
    measure("sft", small, sft, sft, with_kl=False)
    for stage in ppo_names:
        measure(stage, small, load(stage, policy), sft, with_kl=True)
        for split, baseline in itertools.product(report[stage], baselines):
            if isinstance(report[stage][split], dict):
                report[stage][split][f"win_rate_vs_{baseline}"] = float(
                    losses.win_rate(gold[(stage, split)], gold[(baseline, split)]))
        report[stage]["pretrain_loss_regression"] = report[stage]["pretrain_loss"] - report["sft"]["pretrain_loss"]

    rm_rows = [r for r in read_metrics(workdir / "rm" / "metrics.jsonl") if "val/rm_accuracy" in r]
    report["rm"] = {"val_accuracy": rm_rows[-1]["val/rm_accuracy"] if rm_rows else float("nan")}
    if pipe.best_of_n:
        report["rm"].update(rm_best_of_n(small["sampled"], pipe.best_of_n, sft, reward, prompt_sets[""]))
    if cfg.comparisons.labeler == "task":
        report["comparisons"] = label_agreement(workdir / "comparisons", cfg.seed, cfg.comparisons.labeler_temperature)
    policies = [*baselines, *ppo_names]
    samples = {decoding: [{"prompt": generations[("sft", decoding)].prompts[i],
                           **{p: generations[(p, decoding)].responses[i] for p in policies}}
                          for i in range(min(8, len(generations[("sft", decoding)].prompts)))]
               for decoding in decodings}
    return report, samples
