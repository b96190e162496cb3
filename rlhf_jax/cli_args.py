"""What the command line checks beyond the config, and ``rlhf-jax <command> --help``.

Flags that are not config fields (``--stage``, ``--prompt``) are checked here before
anything runs; each error names the flag. A command's help lists the flags it reads and
every config field of its block with the embedded default's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from rlhf_jax.config import Config, ConfigError

# command -> (what it does, its flags beyond --config/--workdir, the config blocks it reads);
# every stage's command comes from the stage table (rlhf_jax.stages.table), the rest are here
OTHER_COMMANDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "pipeline": ("every stage in order (pretrain, SFT, comparisons, RM, then pipeline.methods: PPO and PPO-ptx by "
                 "default), then the evaluation and report; a rerun skips finished stages and resumes an "
                 "interrupted one",
                 (), ("pretrain", "sft", "comparisons", "rm", "generation", "ppo", "pipeline")),
    "evaluate": ("the pipeline's evaluation and report for a run directory of stages run one by one: the SFT "
                 "policy and every method with an export there, on generation.prompts.val_path, judged by the "
                 "embedded task's gold scorer", ("--overwrite",), ("generation", "pipeline")),
    "sample": ("prints responses of a policy export to --prompt (or held-out) prompts",
               ("--export", "--prompt"), ("generation.sampling", "generation.prompts")),
    "label": ("serves the labeling page for human comparisons",
              ("--prompts", "--policy", "--k", "--n-prompts", "--overlap", "--host", "--port", "--stats",
               "--merge"), ("comparisons",)),
}
REWARD_BLOCKS = ("ppo", "rloo", "grpo", "best_of_n")  # the blocks --reward sets reward_init of


def _stage_commands() -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    from rlhf_jax.stages.table import STAGES

    out = {}
    for stage in STAGES:
        if stage.command:
            flags = (("--stop-after-steps",) * (stage.trains and stage.name != "comparisons")
                     + ("--stage",) * stage.method + ("--reward",) * (stage.block in REWARD_BLOCKS))
            blocks = (stage.block or stage.name,) + ("generation",) * (stage.online or not stage.trains)
            out[stage.cli_name] = (stage.summary, flags, blocks)
    return out


COMMANDS = {**_stage_commands(), **OTHER_COMMANDS}
SHARED = ("seed", "model", "mesh", "tokenizer", "distributed", "compilation_cache_dir")
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_command_line(args: argparse.Namespace) -> None:
    """Refuses flags that would write outside the run directory or name nothing."""
    if args.stage is not None and (not STAGE_NAME.fullmatch(args.stage) or args.stage in (".", "..")):
        raise ConfigError(f"--stage {args.stage!r}: a directory name inside the run directory (letters, digits, "
                          "'_', '-', '.'; no '/' and not '..')")
    from rlhf_jax.data.jsonl import is_blank

    for i, prompt in enumerate(args.prompt, 1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"--prompt number {i} is not valid Unicode text (a lone surrogate)") from None
        if is_blank(prompt):
            raise ConfigError(f"--prompt number {i} ({prompt!r}) is empty: the sampler needs a prompt token "
                              "to start from")


def _fields(block: Any, prefix: str) -> list[str]:
    lines = []
    for f in dataclasses.fields(block):
        value = getattr(block, f.name)
        if dataclasses.is_dataclass(value):
            lines += _fields(value, f"{prefix}.{f.name}")
        else:
            lines.append(f"  --{prefix}.{f.name}={value!r}")
    return lines


def stage_help(command: str, parser: argparse.ArgumentParser) -> str:
    """``rlhf-jax <command> --help``: its usage, its flags and its config fields."""
    from rlhf_jax.default_config import default_config

    what, flags, blocks = COMMANDS.get(command, ("", (), ()))
    wanted = {"--config", "--workdir", *flags}
    actions = [a for a in parser._actions if set(a.option_strings) & wanted]  # noqa: SLF001 - argparse's own list
    lines = [f"usage: rlhf-jax {command} " + " ".join(f"[{a.option_strings[-1]} {a.metavar or a.dest.upper()}]"
                                                       if a.nargs != 0 else f"[{a.option_strings[-1]}]"
                                                       for a in actions) + " [--FIELD=VALUE ...]",
             "", f"{command}: {what}.", "", "flags:"]
    lines += [f"  {', '.join(a.option_strings)}: {a.help}" for a in actions]
    cfg: Config = default_config()
    lines += ["", f"config fields it reads (the embedded default's values; --config FILE or --FIELD=VALUE "
                  "changes them, a run directory's config.json is used when it has one):"]
    for block in blocks:
        value = cfg
        for part in block.split("."):
            value = getattr(value, part)
        lines += _fields(value, block)
    shared = [f"--{name}.*" if dataclasses.is_dataclass(getattr(cfg, name)) else f"--{name}" for name in SHARED]
    lines += ["", f"shared by every command: {', '.join(shared)}"]
    return "\n".join(lines)
