#!/usr/bin/env python3
"""Cloud TPU VMs for rlhf_jax: create, set up, launch, watch, stop, delete.

    python tpu_scripts/tpu.py create --name rlhf --zone us-east5-a --accelerator-type v5p-32 [--queued] [--spot]
    python tpu_scripts/tpu.py setup  --name rlhf --zone us-east5-a [--git-url URL --ref main] [--mount-bucket B]
    python tpu_scripts/tpu.py launch --name rlhf --zone us-east5-a --topology v5p-32 -- \\
        sft --config experiments/llama_tpu_pod.py --workdir /mnt/disks/B/runs/llama --sft.epochs=2
    python tpu_scripts/tpu.py logs   --name rlhf --zone us-east5-a --run sft
    python tpu_scripts/tpu.py stop   --name rlhf --zone us-east5-a --run sft
    python tpu_scripts/tpu.py delete --name rlhf --zone us-east5-a [--queued]

Every subcommand takes ``--dry-run``: it prints the exact commands, one per line, and runs
nothing. ``launch`` runs ``rlhf-jax <the arguments after -->`` on every worker (in the
background, logging to ``$HOME/rlhf_jax_runs/<run>.log``), with ``--distributed.mode=auto`` so
the workers of a pod slice join one ``jax.distributed`` run; the arguments are first checked
here with the CLI's own parser and config overrides, so a typo fails before any TPU time is
spent, and then every program the stage runs is compiled here for ``--topology`` (the
slice's accelerator type: ``rlhf-jax compile``, which needs the ``tpu`` extra), so a program
that does not fit a chip's memory stops the launch with its numbers (``--skip-compile-check``
launches without). ``stop`` sends SIGTERM: every process saves a checkpoint at one agreed step and exits;
the same ``launch`` resumes. On a pod slice the ``--workdir`` must be one directory every
worker sees (``setup --mount-bucket`` mounts a GCS bucket at ``/mnt/disks/<bucket>``).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
REMOTE_REPO = "$HOME/rlhf_jax"
RUNS_DIR = "$HOME/rlhf_jax_runs"
ARCHIVE = "/tmp/rlhf_jax.tar.gz"

# The TPU software ("runtime") version JAX needs on each generation's VMs.
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}

Command = list[str]


class ScriptError(ValueError):
    """Arguments that cannot make a valid command; the message says which."""


def runtime_version(accelerator_type: str) -> str:
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
    if not match or match.group(1) not in RUNTIME_VERSIONS:
        raise ScriptError(f"--accelerator-type={accelerator_type!r}: expected <generation>-<cores> with a "
                          f"generation in {sorted(RUNTIME_VERSIONS)} (e.g. v5p-32), or pass --version")
    return RUNTIME_VERSIONS[match.group(1)]


def _where(args) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _queued_id(args) -> str:
    return f"{args.name}-qr"


def _ssh(args, remote: str, worker: str = "all") -> Command:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}",
            f"--command={remote}"]


# ---- subcommands: each returns the commands it would run --------------------------------------

def create(args) -> list[Command]:
    version = args.version or runtime_version(args.accelerator_type)
    capacity = ["--spot"] if args.spot else []
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "create", _queued_id(args),
                 f"--node-id={args.name}", *_where(args), f"--accelerator-type={args.accelerator_type}",
                 f"--runtime-version={version}", *capacity],
                # a queued resource is granted later: this shows its state (ACTIVE = ready)
                ["gcloud", "compute", "tpus", "queued-resources", "describe", _queued_id(args), *_where(args),
                 "--format=value(state.state)"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
             f"--accelerator-type={args.accelerator_type}", f"--version={version}", *capacity]]


def setup(args) -> list[Command]:
    """Puts the repository on every worker and installs it with pip (``[tpu]`` extra)."""
    commands: list[Command] = []
    if args.git_url:
        fetch = (f"(test -d {REMOTE_REPO}/.git || git clone {shlex.quote(args.git_url)} {REMOTE_REPO}) && "
                 f"git -C {REMOTE_REPO} fetch --depth=1 origin {shlex.quote(args.ref)} && "
                 f"git -C {REMOTE_REPO} checkout --force FETCH_HEAD")
    else:  # this checkout's committed tree, copied to every worker
        commands.append(["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={ARCHIVE}", args.ref])
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.name}:{ARCHIVE}",
                         *_where(args), "--worker=all"])
        fetch = f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && tar -xzf {ARCHIVE} -C {REMOTE_REPO}"
    install = f"python3 -m pip install --upgrade pip && python3 -m pip install -e \"{REMOTE_REPO}[tpu]\""
    steps = [fetch, install]
    if args.mount_bucket:
        bucket = shlex.quote(args.mount_bucket)
        mount = f"/mnt/disks/{args.mount_bucket}"
        steps.append(
            "(command -v gcsfuse >/dev/null || ("
            "echo \"deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
            "| sudo tee /etc/apt/sources.list.d/gcsfuse.list && "
            "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
            "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))")
        steps.append(f"sudo mkdir -p {mount} && sudo chown $USER {mount} && "
                     f"(mountpoint -q {mount} || gcsfuse --implicit-dirs {bucket} {mount})")
    commands.append(_ssh(args, " && ".join(steps)))
    return commands


def check_rlhf_jax_args(cli_args: Sequence[str]) -> list[str]:
    """Parses ``rlhf-jax`` arguments with the CLI's own parser and applies the overrides to
    the experiment's config (or the defaults, if the file is not here), so a bad stage, flag
    or field fails now. Returns the arguments with ``--distributed.mode=auto`` added unless
    they set a mode."""
    from rlhf_jax import cli
    from rlhf_jax.config import Config, ConfigError, apply_overrides, load_experiment

    cli_args = list(cli_args)
    if not cli_args:
        raise ScriptError("launch: give the rlhf-jax arguments after --, e.g. -- sft --config X --workdir Y")
    try:
        parsed, overrides = cli._parser().parse_known_args(cli_args)
    except SystemExit as exit_:
        raise ScriptError(f"launch: rlhf-jax would refuse {shlex.join(cli_args)}") from exit_
    if parsed.command == "sample":
        raise ScriptError("launch: 'sample' prints to the terminal; run it with ssh on one worker")
    if parsed.command == "label":  # one server, not one per worker
        raise ScriptError("launch: 'label' serves a page from one machine; run it with ssh on one worker "
                          "(or locally on the run's exports)")
    if not any(a.startswith("--workdir") for a in cli_args):
        raise ScriptError("launch: pass --workdir (on a pod slice, a directory every worker sees)")
    local = pathlib.Path(parsed.config) if parsed.config else None
    if local is not None and not local.is_absolute():
        local = REPO / local  # on the workers the command runs in the repository's root
    try:
        cfg = load_experiment(local) if local is not None and local.is_file() else Config()
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as err:
        raise ScriptError(f"launch: {err}") from err
    except SystemExit as exit_:  # tyro has printed which field and why
        raise ScriptError(f"launch: rlhf-jax would refuse the overrides {overrides}") from exit_
    if not any(a.startswith("--distributed.mode") for a in overrides):
        cli_args.append("--distributed.mode=auto")
    elif cfg.distributed.mode == "off":
        print("launch: --distributed.mode=off: the workers will train as separate runs", file=sys.stderr)
    return cli_args


# the stages whose programs `rlhf-jax compile` checks before each command is launched (every
# command but sample and label; pipeline: the stages the config's pipeline.methods make it run;
# evaluate: best-of-n's, the held-out evaluator's sampler, RM score and KL on generation.prompts)
COMPILED_STAGES = {"pipeline": "pipeline", "pretrain": "pretrain", "sft": "sft", "comparisons": "comparisons",
                   "rm": "rm", "ppo": "ppo", "rloo": "rloo", "grpo": "grpo", "dpo": "dpo", "best-of-n": "best_of_n",
                   "evaluate": "best_of_n"}


def compile_check(args, cli_args: Sequence[str]) -> list[Command]:
    """``rlhf-jax compile`` of the launched stage's programs for ``--topology``, run here
    first: its non-zero exit (a program that does not fit, naming it and its bytes) stops
    the launch. Empty with ``--skip-compile-check``."""
    if args.skip_compile_check:
        return []
    if not args.topology:
        raise ScriptError("launch: pass --topology (the slice's accelerator type, e.g. v5p-32) so every program "
                          "is compiled for it here first, or --skip-compile-check")
    from rlhf_jax import cli
    from rlhf_jax.aot.topology import parse_topology
    from rlhf_jax.config import ConfigError

    try:
        parse_topology(args.topology)
    except ConfigError as err:
        raise ScriptError(f"launch: {err}") from err
    parsed, overrides = cli._parser().parse_known_args(list(cli_args))
    config = []
    if parsed.config:
        local = pathlib.Path(parsed.config)
        local = local if local.is_absolute() else REPO / local
        if not local.is_file():
            raise ScriptError(f"launch: {parsed.config} is not here to compile; run from the checkout that holds "
                              "it, or pass --skip-compile-check")
        config = ["--config", str(local)]
    overrides = [o for o in overrides if not o.startswith("--distributed.")]  # the workers' business
    return [["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "rlhf_jax.cli", "compile", *config,
             "--topology", args.topology, "--stages", COMPILED_STAGES[parsed.command], *overrides]]


def launch(args) -> list[Command]:
    cli_args = check_rlhf_jax_args(args.rlhf_jax_args)
    check = compile_check(args, cli_args)
    run = args.run or cli_args[0]
    exports = [f"export {shlex.quote(kv)}" for kv in args.env]
    remote = " && ".join([
        f"mkdir -p {RUNS_DIR}", f"cd {REMOTE_REPO}", 'export PATH="$HOME/.local/bin:$PATH"', *exports,
        # in the background, so ssh returns; the pid file is what `stop` signals
        f"(nohup rlhf-jax {shlex.join(cli_args)} > {RUNS_DIR}/{run}.log 2>&1 < /dev/null & "
        f"echo $! > {RUNS_DIR}/{run}.pid)"])
    return [*check, _ssh(args, remote)]


def logs(args) -> list[Command]:
    tail = ["tail", f"-n {args.lines}", *(["-F"] if args.follow else []), f"{RUNS_DIR}/{args.run}.log"]
    return [_ssh(args, " ".join(tail), worker=args.worker)]


def stop(args) -> list[Command]:
    signal = "KILL" if args.kill else "TERM"
    return [_ssh(args, f"kill -{signal} $(cat {RUNS_DIR}/{args.run}.pid)")]


def status(args) -> list[Command]:
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "describe", _queued_id(args), *_where(args)]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args)]]


def delete(args) -> list[Command]:
    if args.queued:  # --force also deletes the TPU VM the queued resource made
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", _queued_id(args), *_where(args),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


# ---- command line ----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tpu_scripts/tpu.py", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = top.add_subparsers(dest="subcommand", required=True)

    def sub(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--name", required=True, help="the TPU VM (node) name")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", help="default: gcloud's configured project")
        p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        return p

    p = sub("create", create, "create a TPU VM or pod slice (or queue one)")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v5litepod-16, v4-8")
    p.add_argument("--version", help="TPU software version; default: the one for the accelerator generation")
    p.add_argument("--queued", action="store_true", help="a queued resource (waits for capacity)")
    p.add_argument("--spot", action="store_true", help="spot capacity: cheaper, may be preempted")

    p = sub("setup", setup, "copy or clone the repository to every worker and pip install it")
    p.add_argument("--git-url", help="clone this on the workers; default: copy this checkout's --ref")
    p.add_argument("--ref", default="HEAD", help="commit, branch or tag (default HEAD)")
    p.add_argument("--mount-bucket", help="mount this GCS bucket at /mnt/disks/<bucket> on every worker")

    p = sub("launch", launch, "run rlhf-jax on every worker (arguments after --)")
    p.add_argument("--run", help="name of the log and pid files (default: the stage)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for rlhf-jax on the workers (repeatable)")
    p.add_argument("--topology", help="the slice's accelerator type (v5p-32, v5litepod-16, v4-8): the stage's "
                                      "programs are compiled for it here before anything is launched")
    p.add_argument("--skip-compile-check", action="store_true",
                   help="launch without compiling the programs for the topology first")
    p.add_argument("rlhf_jax_args", nargs=argparse.REMAINDER, help="-- <stage> --config ... --workdir ...")

    p = sub("logs", logs, "show a run's log on one worker")
    p.add_argument("--run", required=True)
    p.add_argument("--worker", default="0", help="worker index, or all")
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--no-follow", dest="follow", action="store_false")

    p = sub("stop", stop, "SIGTERM a run on every worker: it checkpoints and exits; launch again to resume")
    p.add_argument("--run", required=True)
    p.add_argument("--kill", action="store_true", help="SIGKILL instead (resumes from the last checkpoint)")

    p = sub("status", status, "describe the TPU VM or queued resource")
    p.add_argument("--queued", action="store_true")

    p = sub("delete", delete, "delete the TPU VM (or queued resource and its VM)")
    p.add_argument("--queued", action="store_true")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "rlhf_jax_args", None) and args.rlhf_jax_args[0] == "--":
        args.rlhf_jax_args = args.rlhf_jax_args[1:]
    try:
        commands = args.func(args)
    except ScriptError as err:
        print(f"tpu.py {args.subcommand}: error: {err}", file=sys.stderr)
        return 2
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            result = subprocess.run(command)
            if result.returncode:
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # rlhf_jax from this checkout, for checking launch arguments
    sys.exit(main())
