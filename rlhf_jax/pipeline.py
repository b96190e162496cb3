"""The whole InstructGPT pipeline on the embedded task:

pretrain a base LM on the task's corpus -> SFT on demonstrations -> collect comparisons
(K samples per prompt from the SFT policy, ranked by the noisy labeler) -> reward model ->
PPO and PPO-ptx from the same SFT model -> evaluation on held-out prompts -> report.

Every stage is the same function the CLI runs; the pipeline only chains them through
their exports (``run:<stage>/export``). A rerun of the same command skips finished stages
and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, losses
from rlhf_jax.config import Config, ConfigError
from rlhf_jax.evaluation import Generations
from rlhf_jax.logging import read_metrics
from rlhf_jax.report import write_report
from rlhf_jax.stages import common


def gold_metrics(generations: Generations) -> dict[str, float]:
    from rlhf_jax.tasks import gold_scores

    return {"gold_score": float(gold_scores(generations.prompts, generations.responses).mean())}


def _stage_done(workdir: pathlib.Path, stage: str) -> bool:
    return (workdir / stage / "export" / checkpoint.EXPORT_META).exists()


def gold_reward(tokenizer) -> Callable:
    """A :data:`~rlhf_jax.ppo_steps.RewardFn` that is the task's gold scorer: each episode's
    prompt and response are decoded on the host (``jax.pure_callback``) and scored. Rows
    with no prompt (batch padding) score 0. Single-process runs only: the callback sees
    the whole batch on one host."""
    from rlhf_jax.tasks import gold_score

    def host_scores(prompt_tokens, prompt_segments, tokens, mask) -> np.ndarray:
        scores = np.zeros(tokens.shape[0], np.float32)
        for i in range(tokens.shape[0]):
            prompt = tokenizer.decode(prompt_tokens[i][prompt_segments[i] > 0].tolist())
            if prompt.strip():
                scores[i] = gold_score(prompt, tokenizer.decode(tokens[i][mask[i]].tolist()))
        return scores

    def score(params, samples) -> jax.Array:
        del params  # nothing to learn: the scorer is exact
        return jax.pure_callback(host_scores, jax.ShapeDtypeStruct(samples.tokens.shape[:1], jnp.float32),
                                 samples.prompt_tokens, samples.prompt_segments, samples.tokens, samples.mask)

    return score


def ppo_stages(cfg: Config) -> dict[str, Any]:
    """The PPO runs of the pipeline: name -> PPOConfig."""
    runs = {"ppo": dataclasses.replace(cfg.ppo, stage_name="ppo", ptx_coef=0.0)}
    if cfg.pipeline.run_ppo_ptx:
        runs["ppo_ptx"] = dataclasses.replace(cfg.ppo, stage_name="ppo_ptx", ptx_coef=cfg.pipeline.ptx_coef)
    if cfg.pipeline.run_ppo_gold:
        runs["ppo_gold"] = dataclasses.replace(cfg.ppo, stage_name="ppo_gold", ptx_coef=0.0)
    return runs


def run_pipeline(cfg: Config, workdir: str | pathlib.Path, show_progress: bool = True) -> dict[str, Any]:
    """Runs every stage not yet finished in ``workdir``, then evaluates; returns the report."""
    from rlhf_jax.stages.comparisons import run_comparisons
    from rlhf_jax.stages.ppo import run_ppo
    from rlhf_jax.stages.rm import run_rm
    from rlhf_jax.stages.sft import run_sft

    workdir = pathlib.Path(workdir).absolute()
    if cfg.pipeline.best_of_n < 0:
        raise ConfigError(f"pipeline.best_of_n must be >= 0 (0 skips the diagnosis), got {cfg.pipeline.best_of_n}")
    start = time.perf_counter()
    if not _stage_done(workdir, "pretrain"):
        run_sft(cfg, workdir, stage="pretrain", stage_cfg=cfg.pretrain, data_kind="text", show_progress=show_progress)
    if not _stage_done(workdir, "sft"):
        run_sft(cfg, workdir, show_progress=show_progress)
    if cfg.rm.model is not None:  # the larger model the RM starts from, trained the same way
        if not _stage_done(workdir, "pretrain_large"):
            run_sft(cfg, workdir, stage="pretrain_large", stage_cfg=cfg.pretrain, data_kind="text",
                    show_progress=show_progress, model=cfg.rm.model)
        if not _stage_done(workdir, "sft_large"):
            run_sft(cfg, workdir, stage="sft_large", stage_cfg=dataclasses.replace(
                cfg.sft, init_from="run:pretrain_large/export"), show_progress=show_progress, model=cfg.rm.model)
    run_comparisons(cfg, workdir, show_progress=show_progress)
    if not _stage_done(workdir, "rm"):
        run_rm(cfg, workdir, show_progress=show_progress)
    runs = ppo_stages(cfg)
    if cfg.pipeline.run_ppo_gold and jax.process_count() > 1:
        raise ConfigError("pipeline.run_ppo_gold: the gold-scorer reward runs on one host; use a single process")
    for name, ppo in runs.items():
        if not _stage_done(workdir, name):
            reward_fn = gold_reward(common.make_env(cfg, workdir, name).tokenizer) if name == "ppo_gold" else None
            run_ppo(cfg, workdir, ppo=ppo, show_progress=show_progress, generation_metrics=gold_metrics,
                    reward_fn=reward_fn)
    report, samples = evaluate(cfg, workdir, tuple(runs))
    report["wall_seconds"] = time.perf_counter() - start
    report["name"] = cfg.name
    if jax.process_index() == 0:  # every process has the same report; one writes it
        write_report(workdir, report, samples, tuple(runs))
    return report


def rm_best_of_n(evaluator, n: int, sft_params, reward_params, prompts) -> dict[str, float]:
    """The RM as a best-of-n selector among ``n`` samples of the SFT policy on the held-out
    prompts (``evaluator`` samples with PPO's settings): report keys ``best_of_n``,
    ``best_of_n_gold`` (the RM's pick), ``best_of_n_random_gold`` (one sample) and
    ``best_of_n_oracle_gold`` (the gold-best sample)."""
    from rlhf_jax.tasks import gold_scores

    rewards, gold = [], []
    for draw in range(1, n + 1):
        generations = evaluator.generate(sft_params, sft_params, reward_params, prompts, draw=draw)
        rewards.append(generations.scores)
        gold.append(gold_scores(generations.prompts, generations.responses))
    picked, metrics = losses.best_of_n(jnp.asarray(np.stack(rewards)), jnp.asarray(np.stack(gold)))
    return {"best_of_n": n, "best_of_n_gold": float(picked),
            "best_of_n_random_gold": float(metrics["best_of_n/random_gold"]),
            "best_of_n_oracle_gold": float(metrics["best_of_n/oracle_gold"])}


def evaluate(cfg: Config, workdir: pathlib.Path, ppo_names: tuple[str, ...]) -> tuple[dict[str, Any], list[dict]]:
    """Held-out prompts: gold score, win rate over SFT, KL to SFT and pretraining loss of
    the SFT policy and of each PPO policy (greedy responses). With a larger RM base
    (``rm.model``), its SFT model (``sft_large``) is evaluated too and every PPO policy
    gets a win rate against it: the paper's small-PPO-over-large-SFT comparison."""
    from rlhf_jax.data import PromptBatches, TextBatches
    from rlhf_jax.evaluation import PolicyEvaluator
    from rlhf_jax.models import LanguageModel, ScalarModel
    from rlhf_jax.ppo_steps import reward_model_score
    from rlhf_jax.tasks import gold_scores

    env = common.make_env(cfg, workdir, "eval")
    ppo = cfg.ppo
    prompts = PromptBatches(env.data_path(ppo.prompts.val_path, "ppo.prompts.val_path"), env.tokenizer,
                            dataclasses.replace(ppo.prompts, shuffle=False), seed=cfg.seed,
                            cache_dir=env.cache_dir, **env.process)
    texts = TextBatches(env.data_path(ppo.pretrain.val_path, "ppo.pretrain.val_path"), env.tokenizer,
                        dataclasses.replace(ppo.pretrain, shuffle=False), seed=cfg.seed,
                        cache_dir=env.cache_dir, **env.process)
    policy, scalar = LanguageModel(cfg.model), ScalarModel(checkpoint.export_model_config(workdir / "rm" / "export"))
    load = lambda stage, model: checkpoint.load_export(  # noqa: E731
        workdir / stage / "export", common.abstract_params(model, env.mesh), model.cfg)
    reward = load("rm", scalar)
    sft = load("sft", policy)
    sampling = dataclasses.replace(ppo.sampling, temperature=ppo.eval_temperature)

    def evaluator_for(model, params, sampling_cfg) -> PolicyEvaluator:
        return PolicyEvaluator(model, reward_model_score(scalar), env.mesh, jax.tree.map(lambda x: x.sharding, params),
                               env.tokenizer, sampling_cfg, cfg.seed)

    evaluator = evaluator_for(policy, sft, sampling)
    report: dict[str, Any] = {}
    generations: dict[str, Generations] = {}
    gold: dict[str, np.ndarray] = {}

    def measure(name: str, policy_evaluator: PolicyEvaluator, params, ref_params, kl_to_sft: bool = True) -> None:
        generations[name] = policy_evaluator.generate(params, ref_params, reward, prompts)
        gold[name] = gold_scores(generations[name].prompts, generations[name].responses)
        report[name] = {"gold_score": float(gold[name].mean()),
                        "rm_score": float(generations[name].scores.mean()),
                        "pretrain_loss": policy_evaluator.pretrain_loss(params, texts),
                        "response_length": float(generations[name].lengths.mean()),
                        "eos_rate": float(generations[name].ended.mean())}
        if kl_to_sft:
            report[name]["kl_to_sft"] = float(generations[name].kl.mean())

    baselines = ["sft"]
    if cfg.rm.model is not None:
        large = LanguageModel(cfg.rm.model)
        large_sft = load("sft_large", large)
        measure("sft_large", evaluator_for(large, large_sft, sampling), large_sft, large_sft,
                kl_to_sft=False)  # its KL is to itself; the policies' is to the small SFT model
        baselines.append("sft_large")
    for stage in ("sft", *ppo_names):
        measure(stage, evaluator, sft if stage == "sft" else load(stage, policy), sft)
        if stage != "sft":
            for baseline in baselines:
                report[stage][f"win_rate_vs_{baseline}"] = float(losses.win_rate(gold[stage], gold[baseline]))
            report[stage]["pretrain_loss_regression"] = report[stage]["pretrain_loss"] - report["sft"]["pretrain_loss"]
    rm_rows = [r for r in read_metrics(workdir / "rm" / "metrics.jsonl") if "val/rm_accuracy" in r]
    report["rm"] = {"val_accuracy": rm_rows[-1]["val/rm_accuracy"] if rm_rows else float("nan")}
    if cfg.pipeline.best_of_n:
        report["rm"].update(rm_best_of_n(evaluator_for(policy, sft, ppo.sampling), cfg.pipeline.best_of_n, sft,
                                         reward, prompts))
    samples = [{"prompt": generations["sft"].prompts[i], **{s: generations[s].responses[i] for s in generations}}
               for i in range(min(8, len(generations["sft"].prompts)))]
    return report, samples
