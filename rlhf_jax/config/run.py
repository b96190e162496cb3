"""A whole run's :class:`Config`, and how configs are written, read and overridden."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import dacite

from rlhf_jax.atomic import write_text
from rlhf_jax.config.checks import ConfigError, experiment_errors, require_finite
from rlhf_jax.config.model import DistributedConfig, MeshConfig, ModelConfig, TokenizerConfig
from rlhf_jax.config.methods import BestOfNConfig, DPOConfig, GRPOConfig, PPOConfig, RLOOConfig
from rlhf_jax.config.stages import (ComparisonsConfig, DataConfig, GenerationConfig, PipelineConfig, RMConfig,
                                    SFTConfig)


@dataclass(frozen=True)
class Config:
    """A whole run: the model, the mesh and each stage's settings."""

    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: SFTConfig = field(default_factory=lambda: SFTConfig(
        data=DataConfig(train_path="task:pretrain", val_path="task:pretrain_val", batch_size=64, max_len=32)))
    sft: SFTConfig = field(default_factory=SFTConfig)
    comparisons: ComparisonsConfig = field(default_factory=ComparisonsConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # A persistent XLA compilation cache, so a rerun or a resumed stage loads its programs
    # instead of compiling them again: a directory, or run:<path> inside the run directory.
    # "auto": run:xla_cache on a GPU or TPU, where a model's compile takes minutes; off on a
    # CPU, where the embedded pipeline compiles in seconds. None: off, i.e. JAX's own
    # setting (JAX_COMPILATION_CACHE_DIR, which wins whenever it is set). One per process:
    # the first stage's directory is kept (rlhf_jax.stages.common.compilation_cache_directory).
    compilation_cache_dir: str | None = "auto"

    def validate(self) -> "Config":
        """Checks every block, so a bad field is refused before a stage writes anything."""
        require_finite(self)
        self.model.validate()
        for name in BLOCKS:
            getattr(self, name).validate(name)
        reads_collected = any((path or "").startswith("run:comparisons/")
                              for path in (self.rm.data.train_path, self.rm.data.val_path))
        if reads_collected and self.comparisons.k_max > self.rm.k_max:  # else refused only after collecting
            raise ConfigError(f"comparisons.k_max={self.comparisons.k_max} is larger than rm.k_max={self.rm.k_max}: "
                              "the RM pads each prompt's responses to rm.k_max and refuses a comparison with more; "
                              "raise rm.k_max or lower comparisons.k_max")
        return self


BLOCKS = ("pretrain", "sft", "comparisons", "rm", "generation", "ppo", "rloo", "grpo", "dpo", "best_of_n", "pipeline")

# Fields that moved: a saved config (or a dict) that holds the old one is read with its value
# in the new place; an override of the old name is refused with this hint.
MOVED_FIELDS: dict[str, str] = {"ppo.sampling": "generation.sampling",
                                "ppo.eval_temperature": "generation.eval_temperature"}


def _moved(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with each moved field in its new place (both set: an error naming both)."""
    data = {block: dict(fields) if isinstance(fields, dict) else fields for block, fields in data.items()}
    for old, new in MOVED_FIELDS.items():
        (old_block, old_name), (new_block, new_name) = old.split("."), new.split(".")
        if not isinstance(data.get(old_block), dict) or old_name not in data[old_block]:
            continue
        target = data.setdefault(new_block, {})
        if new_name in target:
            raise ConfigError(f"{source}: both {old} (its old place) and {new} are set; keep {new}")
        target[new_name] = data[old_block].pop(old_name)
    return data


def _methods_from_flags(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved before ``pipeline.methods``: its run_ppo_ptx / run_ppo_gold flags say
    which PPO runs it had."""
    pipeline = data.get("pipeline")
    if not isinstance(pipeline, dict) or not {"run_ppo_ptx", "run_ppo_gold"} & set(pipeline):
        return data
    if "methods" in pipeline:
        raise ConfigError("pipeline.run_ppo_ptx / run_ppo_gold and pipeline.methods are both set; keep methods")
    pipeline = dict(pipeline)
    ptx, gold = pipeline.pop("run_ppo_ptx", True), pipeline.pop("run_ppo_gold", False)
    pipeline["methods"] = ["ppo", *(["ppo_ptx"] if ptx else []), *(["ppo_gold"] if gold else [])]
    return {**data, "pipeline": pipeline}


# Fields that were removed, and where their meaning went: a config that still sets one is
# refused with this hint rather than a bare "unknown field".
# A saved config.json that holds one at its old default (every run directory written before
# the removal) is read without it.
REMOVED_FIELDS: dict[str, tuple[Any, str]] = {
    "model.dropout": (0.0, "dropout is a stage setting, not architecture: set pretrain.dropout, sft.dropout "
                           "or rm.dropout (each stage always overwrote model.dropout with its own)"),
    "ppo.stage_name": ("ppo", "the stage's directory is not a hyperparameter: `rlhf-jax ppo --stage NAME` "
                              "(or run_ppo(..., stage=NAME)) names it"),
    **{f"ppo.{name}": (None, f"it is generation.{name} now: one setting for every method, the evaluation "
                             "and sampling") for name in ("sampling", "eval_temperature")},
    **{f"pipeline.{name}": (None, "list the runs in pipeline.methods (e.g. --pipeline.methods ppo ppo_ptx ppo_gold)")
       for name in ("run_ppo_ptx", "run_ppo_gold")},
}


def _refuse_removed(fields: Sequence[str], source: str) -> None:
    for name in fields:
        for removed, (_, hint) in REMOVED_FIELDS.items():
            if name == removed or name.startswith(removed + "."):
                raise ConfigError(f"{source}: {removed} was removed; {hint}")


def _without_removed_defaults(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` less the removed fields that hold their old default; any other value is refused."""
    data = {block: dict(fields) if isinstance(fields, dict) else fields for block, fields in data.items()}
    for name, (default, _) in REMOVED_FIELDS.items():
        block, field_name = name.split(".")
        if isinstance(data.get(block), dict) and field_name in data[block]:
            if data[block][field_name] != default:
                _refuse_removed([name], source)
            del data[block][field_name]
    return data


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Builds a :class:`Config` from a dict, rejecting unknown and ill-typed fields."""
    data = _without_removed_defaults(_methods_from_flags(_moved(data, source)), source)
    try:
        cfg = dacite.from_dict(Config, data, config=dacite.Config(strict=True, cast=[tuple]))
    except dacite.DaciteError as err:
        raise ConfigError(f"{source}: invalid config: {err}") from err
    return cfg.validate()


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True))


def load_config(path: str | pathlib.Path) -> Config:
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    return config_from_dict(data, source=str(path))


def load_experiment(path: str | pathlib.Path) -> Config:
    """Imports an experiment file and returns its ``get_config()``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no experiment file at {path}")
    spec = importlib.util.spec_from_file_location(f"rlhf_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with experiment_errors(path):
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: an experiment file must define get_config() -> Config")
        cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not Config")
    # a value of the wrong type (max_steps=10.0) would be saved to config.json, which every
    # later command in the run directory then refuses: the strict read of a saved config, now
    return config_from_dict(to_dict(cfg), source=f"{path} (get_config())")


def apply_overrides(cfg: Config, args: Sequence[str]) -> Config:
    """Applies ``--dotted.field=value`` overrides; unknown or ill-typed fields exit with an error."""
    import tyro

    if not args:
        return cfg.validate()
    _refuse_removed([arg.split("=", 1)[0].removeprefix("--").replace("-", "_") for arg in args], "override")
    # HelptextFromCommentsOff: tyro would otherwise ast-parse this module for field comments
    # while reporting an error, which CPython 3.11.7 can fail with "AST constructor recursion
    # depth mismatch" (a SystemError instead of the error message) when called deep in a stack.
    try:
        new = tyro.cli(Config, default=cfg, args=list(args),
                       config=(tyro.conf.FlagConversionOff, tyro.conf.HelptextFromCommentsOff), prog="rlhf-jax")
    except SystemError as err:  # the CPython bug above: report the value error tyro was rendering
        print(f"rlhf-jax: error: invalid override in {list(args)}: {err.__context__ or err}", file=sys.stderr)
        raise SystemExit(2) from err
    return new.validate()
