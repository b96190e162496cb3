"""The whole InstructGPT pipeline on the embedded task:

pretrain a base LM on the task's corpus -> SFT on demonstrations -> collect comparisons
(K samples per prompt from the SFT policy, ranked by the noisy labeler) -> reward model ->
the methods of ``pipeline.methods`` (default PPO and PPO-ptx; also RLOO, GRPO, DPO,
best-of-n, PPO on the gold scorer), each from the same SFT model -> evaluation on held-out
prompts -> report.

Every stage is the same function the CLI runs; the pipeline only chains them through
their exports (``run:<stage>/export``). A rerun of the same command skips finished stages
and resumes an interrupted one from its checkpoint. ``rlhf-jax evaluate`` runs the same
evaluation on a run directory whose stages were run one by one (:func:`evaluate_run`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import jax

from rlhf_jax import checkpoint
from rlhf_jax.atomic import write_text
from rlhf_jax.config import GOLD_REWARD, BestOfNConfig, Config, ConfigError, OnlineConfig
from rlhf_jax.report import write_report
from rlhf_jax.stages.loop import Interrupted, Preemption
from rlhf_jax.stages.table import BY_NAME, STAGES, RunOptions, Stage, check_methods


def _stage_done(workdir: pathlib.Path, stage: str) -> bool:
    if stage == "comparisons":  # no export: its files
        from rlhf_jax.stages.comparisons import collected

        return collected(workdir / stage)
    return (workdir / stage / "export" / checkpoint.EXPORT_META).exists()


TIMINGS = "timings.json"  # seconds spent per stage, summed over every invocation that got past it


def _read_timings(workdir: pathlib.Path) -> dict[str, float]:
    path = workdir / TIMINGS
    return json.loads(path.read_text()) if path.exists() else {}


def _add_seconds(workdir: pathlib.Path, name: str, seconds: float) -> None:
    """Adds ``seconds`` to stage ``name`` in ``<workdir>/timings.json``.

    A resumed pipeline skips finished stages, so its own clock would report only what it
    ran; the report's ``wall_seconds`` is the sum over stages instead (a kill -9 loses the
    killed invocation's seconds of the stage it was in)."""
    path = workdir / TIMINGS
    timings = _read_timings(workdir)
    timings[name] = timings.get(name, 0.0) + seconds
    if jax.process_index() == 0:
        write_text(path, json.dumps(timings, indent=1))


def run_pipeline(cfg: Config, workdir: str | pathlib.Path, show_progress: bool = True) -> dict[str, Any]:
    """Runs every stage not yet finished in ``workdir``, then evaluates; returns the report.

    A SIGTERM (preemption) stops it where it is: a training stage saves the step it is at,
    a stage between steps finishes first; then :class:`Interrupted` says where, and
    rerunning the same call resumes from there."""
    workdir = pathlib.Path(workdir).absolute()
    cfg.validate()
    methods = check_methods(cfg.pipeline.methods)
    if cfg.ppo.ptx_coef != 0.0:  # the pipeline sets it per PPO run
        raise ConfigError(f"ppo.ptx_coef={cfg.ppo.ptx_coef}: the pipeline "
                          "runs ppo with ptx_coef 0 and ppo_ptx with pipeline.ptx_coef; set pipeline.ptx_coef "
                          "(or leave ppo_ptx out of pipeline.methods) instead, or run `rlhf-jax ppo` for a single "
                          "PPO stage")
    rewards = {m.name: getattr(cfg, m.block).reward_init for m in methods
               if isinstance(getattr(cfg, m.block or "dpo"), (OnlineConfig, BestOfNConfig))}
    gold_runs = [name for name, reward in rewards.items() if name == "ppo_gold" or reward == GOLD_REWARD]
    if gold_runs and jax.process_count() > 1:
        raise ConfigError(f"pipeline.methods {gold_runs}: the gold-scorer reward runs on one host; use a single "
                          "process")
    with Preemption() as preemption:
        return _run_stages(cfg, workdir, show_progress, preemption, methods)


def _run_stages(cfg: Config, workdir: pathlib.Path, show_progress: bool, preemption: Preemption,
                methods: tuple[Stage, ...]) -> dict[str, Any]:
    from rlhf_jax.stages.sft import run_sft
    from rlhf_jax.task_eval import task_metrics

    def stage(name: str, run: Callable[[], Any]) -> None:
        """Runs ``run`` unless stage ``name`` is finished; stops the pipeline on a SIGTERM."""
        if _stage_done(workdir, name):
            run()  # returns at once, having checked it was made from this run's inputs (else refuses)
            return
        if preemption.signalled:
            raise Interrupted(f"before stage {name}")
        started = time.perf_counter()
        result = run()
        _add_seconds(workdir, name, time.perf_counter() - started)
        if result is None:  # a training stage that stopped early has saved its step
            steps = checkpoint.finished_steps(workdir / name / "checkpoints")
            raise Interrupted(f"in stage {name} at step {steps[-1] if steps else 0}")

    def table_stage(name: str, **options: Any) -> None:
        entry = BY_NAME[name]
        stage(name, lambda: entry.run(cfg, workdir, RunOptions(stage=name, show_progress=show_progress, **options)))

    table_stage("pretrain")
    table_stage("sft")
    if cfg.rm.model is not None:  # the larger model the RM starts from, trained the same way
        stage("pretrain_large", lambda: run_sft(cfg, workdir, stage="pretrain_large", stage_cfg=cfg.pretrain,
                                                data_kind="text", show_progress=show_progress, model=cfg.rm.model))
        stage("sft_large", lambda: run_sft(cfg, workdir, stage="sft_large", stage_cfg=dataclasses.replace(
            cfg.sft, init_from="run:pretrain_large/export"), show_progress=show_progress, model=cfg.rm.model))
    table_stage("comparisons")
    table_stage("rm")
    for method in methods:
        if method.trains:  # best-of-n changes no weight: the evaluation samples it
            table_stage(method.name, generation_metrics=task_metrics if method.online else None)
    if preemption.signalled:
        raise Interrupted("before the evaluation (every stage finished)")
    with preemption.raising("during the evaluation (every stage finished; a rerun evaluates again)"):
        return evaluate_and_report(cfg, workdir, methods)


def evaluate_and_report(cfg: Config, workdir: pathlib.Path, methods: tuple[Stage, ...]) -> dict[str, Any]:
    """The evaluation (:func:`rlhf_jax.task_eval.evaluate`) of the SFT policy and ``methods``
    in ``workdir``, written as the run's report (report.json, report.md, plots); returns it."""
    from rlhf_jax.task_eval import evaluate

    started = time.perf_counter()
    report, samples = evaluate(cfg, workdir, methods)
    # every training stage's seconds over all invocations, and this run's evaluation (a rerun repeats it)
    timings = {**_read_timings(workdir), "evaluation": time.perf_counter() - started}
    report["stage_seconds"] = timings
    report["wall_seconds"] = sum(timings.values())
    report["name"] = cfg.name
    if jax.process_index() == 0:  # every process has the same report; one writes it
        write_report(workdir, report, samples, methods)
    return report


def evaluate_run(cfg: Config, workdir: str | pathlib.Path, overwrite: bool = False) -> dict[str, Any]:
    """``rlhf-jax evaluate``: the pipeline's evaluation and report for a run directory whose
    stages were run one by one (``rlhf-jax sft``, ``rm``, ``ppo``, ...): the SFT policy and
    every method of the stage table with an export in ``workdir``, on
    ``generation.prompts.val_path``, judged by the embedded task's gold scorer (text prompts,
    or conversations whose user message is the task prompt). Needs ``sft`` and ``rm`` exports.
    Refuses to replace a report already in ``workdir`` unless ``overwrite``."""
    workdir = pathlib.Path(workdir).absolute()
    for stage in ("sft", "rm"):
        if not _stage_done(workdir, stage):
            raise ConfigError(f"evaluate: {workdir / stage / 'export'} is not a finished export; the evaluation "
                              f"needs the run's SFT policy and reward model (rlhf-jax {stage} --workdir {workdir})")
    if (workdir / "report.json").exists() and not overwrite:
        raise ConfigError(f"evaluate: {workdir / 'report.json'} exists; pass --overwrite to replace the report")
    methods = tuple(stage for stage in STAGES if stage.method and stage.trains and _stage_done(workdir, stage.name))
    return evaluate_and_report(cfg, workdir, methods)
