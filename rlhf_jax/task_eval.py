"""The pipeline's evaluation on the embedded task: every policy on held-out prompts, judged
by the gold scorer with the paper's metadata (Fig. 4), greedily and sampled.

For each policy (``sft``, ``sft_large`` when the RM has a larger base, each method of
``pipeline.methods`` that trains one) the report holds, per decoding (``greedy``; ``sampled``:
``pipeline.eval_samples`` draws per prompt at the sampling temperature, ``generation.sampling``)
and per prompt set (the trained families; with a
``heldout_`` prefix, the families only pretraining text asks):

- ``gold_score`` and, for the methods, ``win_rate_vs_sft`` (and ``win_rate_vs_sft_large``):
  per prompt and draw, ties half; each with its standard error over prompts (``_stderr``:
  a prompt's draws averaged first, as they are not independent);
- the flaw rates of :func:`rlhf_jax.tasks.flaw_rates` (``constraint_violation``,
  ``hallucination``, ``offensive_respectful``, ``offensive``, ``rambling``) and
  ``attempts_instruction``;
- ``rm_score``, ``response_length``, ``eos_rate``; for sampled responses of the policies
  that share the SFT model's architecture, ``kl_to_sft``: the summed per-token estimate
  ``generation.kl_estimator`` of KL(policy || SFT) at that temperature, what the online
  methods' ``<method>/kl_to_ref`` measures on training episodes.

The gold scorer reads the task prompt: a prompt file of conversations (``rlhf-jax data
task-conversations``, rendered by a chat template) is judged on each user message, and the
responses end at the template's end-of-turn token, where the sampler stops.

Plus each policy's pretraining loss (the alignment tax; when ``pipeline.eval_texts.val_path``
is set), the RM's held-out accuracy and
best-of-n picks among SFT samples, the best-of-n frontier (``frontier``: the RM's pick of n
SFT samples at each n of ``pipeline.frontier``, against the analytic KL), best-of-n as a
method (``best_of_n``: ``best_of_n.n``, sampled only), and how far the labels agree with a
second labeler and with the gold order.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, parameters
from rlhf_jax.config import Config, ConfigError
from rlhf_jax.evaluation import Generations, PolicyEvaluator, best_of_n_picks, sample_draws
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


def rm_best_of_n(draws: list[Generations], golds: list[np.ndarray]) -> dict[str, float]:
    """The RM as a best-of-n selector among ``n = len(draws)`` samples of the SFT policy on the
    held-out prompts (each draw scored by the RM, ``golds`` its gold scores): report keys
    ``best_of_n``, ``best_of_n_gold`` (the RM's pick), ``best_of_n_random_gold`` (one sample)
    and ``best_of_n_oracle_gold`` (the gold-best sample)."""
    rewards = jnp.asarray(np.stack([d.scores for d in draws]))
    picked, metrics = losses.best_of_n(rewards, jnp.asarray(np.stack(golds)))
    return {"best_of_n": len(draws), "best_of_n_gold": float(picked),
            "best_of_n_random_gold": float(metrics["random_gold"]),
            "best_of_n_oracle_gold": float(metrics["oracle_gold"])}


def frontier(draws: list[Generations], ns: tuple[int, ...]) -> list[dict[str, float]]:
    """Best-of-n of the SFT policy's draws at each n of ``ns``: the gold and RM score of the
    RM's pick, averaged over the disjoint groups of n draws, against the analytic KL to SFT
    ``log n - (n - 1) / n`` (:func:`losses.best_of_n_kl`): the frontier a method that moves
    the policy should beat at equal KL."""
    points = []
    for n in ns:
        picks = [generations for generations, _ in best_of_n_picks(draws, n)]
        points.append({"n": n, "kl_to_sft": losses.best_of_n_kl(n), "groups": len(picks),
                       "gold_score": float(np.mean([gold_of(p).mean() for p in picks])),
                       "rm_score": float(np.mean([p.scores.mean() for p in picks]))})
    return points


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


def _summary(generations: Generations, gold: np.ndarray, with_kl: bool, n_prompts: int) -> dict[str, float]:
    out = {**task_metrics(generations), "gold_score": float(gold.mean()),
           "gold_score_stderr": float(losses.stderr_over_prompts(jnp.asarray(gold), n_prompts)),
           "rm_score": float(generations.scores.mean()), "response_length": float(generations.lengths.mean()),
           "eos_rate": float(generations.ended.mean())}
    if with_kl and generations.kl is not None:
        out["kl_to_sft"] = float(generations.kl.mean())
    return out


def evaluate(cfg: Config, workdir: pathlib.Path, methods: tuple[Any, ...]) -> tuple[dict[str, Any], dict]:
    """The report's evaluation (see the module docstring) of the SFT policy and every
    method (stages of :mod:`rlhf_jax.stages.table`), and sample responses for it:
    ``{"greedy": rows, "sampled": rows}``, each row a prompt and every policy's response."""
    from rlhf_jax.data import PromptBatches, TextBatches
    from rlhf_jax.models import LanguageModel, ScalarModel
    from rlhf_jax.policy import reward_model_score
    from rlhf_jax.stages.comparisons import collected
    from rlhf_jax.tasks import task_prompt

    env = common.make_env(cfg, workdir, "eval")
    gen, pipe = cfg.generation, cfg.pipeline

    def prompt_set(spec: str, field: str):
        batches = env.batches(PromptBatches, spec, field, dataclasses.replace(gen.prompts, shuffle=False))
        if batches.num_truncated:  # a cut prompt (its head, or a chat template's start) is no task prompt
            raise ConfigError(f"{field}={spec!r}: {batches.num_truncated} of its {batches.num_rows} prompts are longer "
                              f"than generation.prompts.max_len={gen.prompts.max_len} tokens; the gold scorer needs "
                              "each whole, so raise generation.prompts.max_len")
        return batches

    prompt_sets = {"": prompt_set(gen.prompts.val_path, "generation.prompts.val_path")}
    if pipe.heldout_prompts:
        prompt_sets["heldout_"] = prompt_set(pipe.heldout_prompts, "pipeline.heldout_prompts")
    texts = (env.batches(TextBatches, pipe.eval_texts.val_path, "pipeline.eval_texts.val_path",
                         dataclasses.replace(pipe.eval_texts, shuffle=False)) if pipe.eval_texts.val_path else None)
    policy = LanguageModel(cfg.model)
    scalar = ScalarModel(parameters.source("run:rm/export", "rm export", workdir).model)
    load = lambda stage, model: env.load_params(f"run:{stage}/export", model, f"{stage} export")[0]  # noqa: E731
    reward, sft = load("rm", scalar), load("sft", policy)
    decodings = {"greedy": dataclasses.replace(gen.sampling, temperature=0.0), "sampled": gen.sampling}

    def evaluators_for(model, params) -> dict[str, PolicyEvaluator]:
        shardings = jax.tree.map(lambda x: x.sharding, params)
        return {name: PolicyEvaluator(model, reward_model_score(scalar), env.mesh, shardings, env.tokenizer,
                                      sampling, cfg.seed, gen.kl_estimator) for name, sampling in decodings.items()}

    report: dict[str, Any] = {"evaluation": {
        "temperature": gen.sampling.temperature, "samples_per_prompt": pipe.eval_samples,
        "kl_estimator": gen.kl_estimator, "prompts": prompt_sets[""].num_rows,
        **({"heldout_prompts": prompt_sets["heldout_"].num_rows} if "heldout_" in prompt_sets else {})}}
    generations: dict[tuple[str, str], Generations] = {}
    gold: dict[tuple[str, str], np.ndarray] = {}

    def measure(name: str, evaluators: dict[str, PolicyEvaluator], params, ref_params, with_kl: bool) -> None:
        # no pipeline.eval_texts.val_path: no alignment tax measured (a chat run may have no such texts)
        report[name] = {} if texts is None else {"pretrain_loss": evaluators["greedy"].pretrain_loss(params, texts)}
        for (prefix, batches), (decoding, evaluator) in itertools.product(prompt_sets.items(), evaluators.items()):
            key = (name, prefix + decoding)
            generations[key] = (evaluator.generate(params, ref_params, reward, batches) if decoding == "greedy"
                                else evaluator.generate_draws(params, ref_params, reward, batches, pipe.eval_samples))
            gold[key] = gold_of(generations[key])
            report[name][prefix + decoding] = _summary(generations[key], gold[key], with_kl, batches.num_rows)

    def compare(name: str) -> None:
        """Win rates over the baselines on every split both have, and the alignment tax."""
        for split, baseline in itertools.product(report[name], baselines):
            if isinstance(report[name][split], dict) and (baseline, split) in gold:
                ours, theirs = gold[(name, split)], gold[(baseline, split)]
                ours = np.tile(ours, len(theirs) // len(ours))  # best-of-n: one pick per prompt, each draw
                # compared as computed (float64): in float32 close gold scores would tie
                wins = losses.win_outcomes(ours, theirs)
                n_prompts = prompt_sets["heldout_" if split.startswith("heldout_") else ""].num_rows
                report[name][split][f"win_rate_vs_{baseline}"] = float(jnp.mean(wins))
                report[name][split][f"win_rate_vs_{baseline}_stderr"] = float(losses.stderr_over_prompts(wins, n_prompts))
        if "pretrain_loss" in report[name]:
            report[name]["pretrain_loss_regression"] = report[name]["pretrain_loss"] - report["sft"]["pretrain_loss"]

    small = evaluators_for(policy, sft)
    baselines = ["sft"]
    if cfg.rm.model is not None:
        large = LanguageModel(cfg.rm.model)
        large_sft = load("sft_large", large)
        # its KL would be to itself; the policies' is to the small SFT model
        measure("sft_large", evaluators_for(large, large_sft), large_sft, large_sft, with_kl=False)
        baselines.append("sft_large")
    measure("sft", small, sft, sft, with_kl=False)
    policies = [stage.name for stage in methods if stage.trains]
    for name in policies:
        measure(name, small, load(name, policy), sft, with_kl=True)
        compare(name)

    # the SFT policy's draws, scored by the RM: the RM's best-of-n diagnosis, the frontier, best-of-n
    bon = cfg.best_of_n.n if any(not stage.trains for stage in methods) else 0
    started = time.perf_counter()
    draws = sample_draws(small["sampled"], sft, reward, prompt_sets[""], max(pipe.best_of_n, bon, *pipe.frontier, 0))
    draw_golds = [gold_of(d) for d in draws]
    if bon:
        picked, _ = best_of_n_picks(draws[:bon], bon)[0]
        picked.kl = np.full(len(picked.responses), losses.best_of_n_kl(bon))  # analytic: the pick is a sample
        key = ("best_of_n", "sampled")
        generations[key], gold[key] = picked, gold_of(picked)
        report["best_of_n"] = {"n": bon, **{k: v for k, v in report["sft"].items() if k == "pretrain_loss"},
                               "sampled": _summary(picked, gold[key], with_kl=True,
                                                   n_prompts=prompt_sets[""].num_rows)}
        compare("best_of_n")
        report["best_of_n"]["wall_seconds"] = time.perf_counter() - started
        policies.append("best_of_n")
    rm_rows = [r for r in read_metrics(workdir / "rm" / "metrics.jsonl") if "val/rm_accuracy" in r]
    report["rm"] = {"val_accuracy": rm_rows[-1]["val/rm_accuracy"] if rm_rows else float("nan")}
    if pipe.best_of_n:
        report["rm"].update(rm_best_of_n(draws[:pipe.best_of_n], draw_golds[:pipe.best_of_n]))
    if pipe.frontier:
        report["frontier"] = frontier(draws, pipe.frontier)
    if cfg.comparisons.labeler == "task" and collected(workdir / "comparisons"):  # a run of its own comparisons
        report["comparisons"] = label_agreement(workdir / "comparisons", cfg.seed, cfg.comparisons.labeler_temperature)
    policies = [*baselines, *policies]
    samples = {decoding: [{"prompt": task_prompt(generations[("sft", decoding)].prompts[i]),
                           **{p: generations[(p, decoding)].responses[i] for p in policies
                              if (p, decoding) in generations}}
                          for i in range(min(8, len(generations[("sft", decoding)].prompts)))]
               for decoding in decodings}
    return report, samples
