"""``rlhf-jax {sft, rm, ...} [--config experiments/x.py] [--workdir DIR] [--a.b=value ...]``,
``rlhf-jax convert --from-hf DIR --out DIR`` / ``--to-hf EXPORT --out DIR`` and
``rlhf-jax data convert --format NAME --out DIR INPUT...`` (public data sets into our JSONL).

``--config`` names an experiment file (default: the run directory's saved ``config.json`` if
there is one, else the embedded default that ``experiments/tiny_cpu.py`` also returns);
every other ``--dotted.field=value`` overrides a config field.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys

from rlhf_jax.cli_args import REWARD_BLOCKS, check_command_line
from rlhf_jax.config import Config, ConfigError, apply_overrides, load_config, load_experiment
from rlhf_jax.distributed import maybe_initialize
from rlhf_jax.host import keep_freed_memory
from rlhf_jax.stages.table import STAGES as TABLE  # the table imports no model
from rlhf_jax.stages.table import BY_NAME, stage_named

STAGE_COMMANDS = tuple(stage.cli_name for stage in TABLE if stage.command)
STAGES = ("pipeline", *STAGE_COMMANDS, "evaluate", "sample", "label")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # convert, data and compile have their own flags and parsers (rlhf_jax.convert, rlhf_jax.data.cli,
    # rlhf_jax.aot.command); listed here so --help names them
    parser.add_argument("command", choices=(*STAGES, "convert", "data", "compile"),
                        help="a stage, the whole pipeline, evaluate (a run's policies, as the pipeline does), "
                             "sample, label, convert, data, or compile (for a TPU topology; --help after it for its "
                             "flags)")
    parser.add_argument("--config", help="experiment file defining get_config(); default: the embedded tiny config")
    parser.add_argument("--workdir", default="runs/default", help="run directory (resumes if it holds checkpoints)")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="run at most this many steps now, checkpoint and exit 0; rerun to continue")
    parser.add_argument("--stage", default=None,
                        help="a stage's directory inside the run directory (default: its name, e.g. ppo)")
    parser.add_argument("--reward", default=None,
                        help="ppo, rloo, grpo, best-of-n: the reward, a reward-model export (default run:rm/export) "
                             "or 'gold' (the embedded task's gold scorer); sets <stage>.reward_init")
    parser.add_argument("--overwrite", action="store_true",
                        help="evaluate: replace the run directory's report (report.json, report.md, plots)")
    parser.add_argument("--export", help="sample: the policy export directory to generate from")
    parser.add_argument("--prompt", action="append", default=[],
                        help="sample: a prompt (repeatable); default: the first held-out prompts")
    label = parser.add_argument_group("label (human comparisons; see rlhf_jax/labeling)")
    label.add_argument("--prompts", help="label: JSONL of {prompt, responses} to rank, or of {prompt} with --policy")
    label.add_argument("--policy", help="label: a policy export (e.g. run:sft/export) to sample --k responses from")
    label.add_argument("--k", type=int, default=4, help="label: responses sampled per prompt (2..9)")
    label.add_argument("--n-prompts", type=int, default=100, help="label: prompts to sample responses for")
    label.add_argument("--overlap", type=int, default=10,
                       help="label: the first N items are shown to every labeler (for agreement)")
    label.add_argument("--host", default=None,
                       help="label: address to bind (default 127.0.0.1); one that is not loopback (127.x, ::1, "
                            "localhost) prints an address with an access token")
    label.add_argument("--guidelines", help="label: a Markdown file of instructions shown to labelers "
                                            "(default: the packaged ones)")
    label.add_argument("--port", type=int, default=8765, help="label: port (0: any free one)")
    label.add_argument("--stats", action="store_true", help="label: print agreement statistics and exit")
    label.add_argument("--merge", action="store_true",
                       help="label: write every labeler's comparisons into labels/merged/comparisons.jsonl and exit")
    return parser


def resolve_config(config_path: str | None, workdir: str, overrides: list[str]) -> Config:
    """The experiment file if given; else the run's saved config (so a rerun or ``sample``
    in an existing run directory uses that run's settings); else the embedded default."""
    from rlhf_jax.default_config import default_config

    saved = pathlib.Path(workdir) / "config.json"
    if config_path:
        cfg = load_experiment(config_path)
    elif saved.is_file():
        cfg = load_config(saved)
    else:
        cfg = default_config()
    return apply_overrides(cfg, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()  # before the JAX backend starts its threads
    if argv[:1] == ["convert"]:
        from rlhf_jax.convert import main as convert_main

        return _reported("convert", lambda: convert_main(argv[1:]))
    if argv[:1] == ["data"]:
        from rlhf_jax.data.cli import main as data_main

        return _reported("data", lambda: data_main(argv[1:]))
    if argv[:1] == ["compile"]:  # ahead-of-time compilation for a TPU topology (docs/tpu.md)
        from rlhf_jax.aot.command import main as compile_main

        return _reported("compile", lambda: compile_main(argv[1:]))
    if argv[:1] and argv[0] in STAGES and {"-h", "--help"} & set(argv[1:]):
        from rlhf_jax.cli_args import stage_help

        print(stage_help(argv[0], _parser()))
        return 0
    args, overrides = _parser().parse_known_args(argv)
    return _reported(args.command, lambda: _resolve_and_run(args, overrides))


def _resolve_and_run(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf_jax.stages.loop import Interrupted

    try:
        if args.stop_after_steps is not None and args.stop_after_steps < 1:
            raise ConfigError(f"--stop-after-steps must be >= 1, got {args.stop_after_steps}")
        if args.reward is not None:
            stage = BY_NAME.get(args.command.replace("-", "_"))
            if stage is None or stage.block not in REWARD_BLOCKS:
                raise ConfigError(f"--reward applies to ppo, rloo, grpo and best-of-n, not {args.command}")
            overrides = [*overrides, f"--{stage.block}.reward_init={args.reward}"]
        cfg = resolve_config(args.config, args.workdir, overrides)  # validates every field first
        check_command_line(args)
        maybe_initialize(cfg.distributed)  # before anything touches a device
        with _run_directory_lock(args.command, args.workdir):
            _run(args, cfg)
    except Interrupted as stop:  # a SIGTERM stopped the pipeline after the stage saved
        print(stop)
    return 0


def _reported(command: str, run) -> int:
    """``run()``'s exit status; a failure that is not a bug (a refused input, a full disk, a
    NaN stop: see :mod:`rlhf_jax.failures`) is one line and status 2, Ctrl-C status 130."""
    from rlhf_jax.failures import one_line, quiet_background_failures

    quiet_background_failures()
    try:
        return run()
    except KeyboardInterrupt:
        print(f"rlhf-jax {command}: interrupted (Ctrl-C); rerun the same command to resume from the last "
              "finished checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one_line decides; anything else is re-raised
        message = one_line(err)
        if message is None:
            raise
        print(f"rlhf-jax {command}: error: {message}", file=sys.stderr)
        return 2


def _run_directory_lock(command: str, workdir: str):
    """Every command that writes into the run directory holds its lock (process 0 for all)."""
    import jax

    from rlhf_jax.run_lock import hold_run_directory

    # sample only reads; label holds <workdir>/labels/.lock itself, so the RM can train meanwhile
    if command in ("sample", "label") or jax.process_index() != 0:
        return contextlib.nullcontext()
    return hold_run_directory(workdir)


def _run(args: argparse.Namespace, cfg: Config) -> None:
    """Runs one command in a validated config (the lock held)."""
    if args.command == "pipeline":
        from rlhf_jax.pipeline import run_pipeline

        _print_summary(run_pipeline(cfg, args.workdir), args.workdir)
    elif args.command in STAGE_COMMANDS:
        from rlhf_jax.stages.table import RunOptions

        stage = stage_named(args.command, "command")
        result = stage.run(cfg, args.workdir, RunOptions(stage=args.stage, stop_after=args.stop_after_steps,
                                                         generation_metrics=_task_metrics(cfg, stage)))
        name = args.stage or stage.name
        done = f"{name} export: {result}" if stage.trains and stage.name != "comparisons" else f"{name}: {result}"
        print(done if result else f"{name}: stopped early; rerun to resume")
    elif args.command == "evaluate":
        from rlhf_jax.pipeline import evaluate_run

        _print_summary(evaluate_run(cfg, args.workdir, overwrite=args.overwrite), args.workdir)
    elif args.command == "sample":
        from rlhf_jax.generate import generate_from_export

        if not args.export:
            raise ConfigError("sample: --export DIR (a policy export) is required")
        from rlhf_jax.data.chat import prompt_text

        for prompt, response in generate_from_export(cfg, args.workdir, args.export, args.prompt, chat_prompts=True):
            print(f"{prompt_text(prompt)} {response}")
    elif args.command == "label":
        _label(args, cfg)


def _print_summary(report: dict, workdir: str) -> None:
    """The report's headline: where it is, the RM's accuracy, each policy's sampled gold score
    and win rates (with their standard errors over prompts)."""
    print(f"report: {pathlib.Path(workdir) / 'report.md'}")
    print(f"  RM held-out accuracy {report['rm']['val_accuracy']:.3f}; sampled held-out responses:")
    for stage in ("sft", "sft_large", *(s.name for s in TABLE if s.method)):
        sampled = report.get(stage, {}).get("sampled", {})
        if "gold_score" not in sampled:
            continue
        wins = [f", win rate vs {b} {sampled[f'win_rate_vs_{b}']:.3f} +- {sampled[f'win_rate_vs_{b}_stderr']:.3f}"
                for b in ("sft", "sft_large") if f"win_rate_vs_{b}" in sampled]
        print(f"  {stage}: gold score {sampled['gold_score']:.3f} +- {sampled['gold_score_stderr']:.3f}"
              + "".join(wins))


def _task_metrics(cfg: Config, stage):
    """The gold score and flaw rates of an online method's held-out evaluations when they
    are the embedded task's prompts (the gold scorer reads only those); else None."""
    if not stage.online or not (getattr(cfg, stage.block).prompts.val_path or "").startswith("task:"):
        return None
    from rlhf_jax.task_eval import task_metrics

    return task_metrics


def _label(args: argparse.Namespace, cfg: Config) -> None:
    from rlhf_jax.labeling import command
    from rlhf_jax.labeling.storage import labels_dir
    from rlhf_jax.run_lock import hold_run_directory

    workdir = pathlib.Path(args.workdir)
    if args.stats:
        command.print_stats(workdir)
        return
    if args.merge:
        command.merge_labels(workdir)
        return
    with hold_run_directory(labels_dir(workdir)):  # one labeling server per run directory
        items = command.prepare_items(cfg, workdir, args.prompts, args.policy, args.k, args.n_prompts, args.overlap)
        command.serve(workdir, items, args.host, args.port, args.guidelines)


if __name__ == "__main__":
    sys.exit(main())
