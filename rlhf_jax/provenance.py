"""What a stage's result depends on (its *inputs*), so that a changed run is never resumed
or skipped silently.

A stage records its inputs in every checkpoint's metadata and in its export (comparisons:
beside their files). A resume compares them with the inputs the run has now, and so does a
stage that finds itself finished (the pipeline's skip of a finished stage goes through it),
before anything is written: any difference is refused, naming each input that changed.

The inputs of a stage, each under the name the user changes it by:

- ``seed``, and ``tokenizer``: the SHA-256 of its files (a same-size vocabulary with
  permuted ids differs), with its other fields (``tokenizer.chat_template``);
- ``model.<field>``: every architecture field (``model.hf_path`` as a source, below);
- ``<block>.<field>``: every field of the stage's config block but those that only say how
  often it logs, evaluates and saves (:data:`NOT_RESULT`) and the model fields a resume may
  change (``config.model.EXECUTION_FIELDS``, ``LAYOUT_FIELDS``);
- data files (:data:`DATA_FIELDS`) by the SHA-256 of their content, not their path;
- parameter sources (:data:`SOURCE_FIELDS`): an export by the inputs it was made from (a
  rerun that exports the same params again keeps its identity), anything else (a HF
  directory, an export without recorded inputs, a checkpoint step) by the SHA-256 of its
  files.

A new config block or stage is covered by the same rules: its fields are walked, and its
paths are recognised by these field names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

from rlhf_jax import checkpoint, parameters
from rlhf_jax.config import ConfigError
from rlhf_jax.config.model import EXECUTION_FIELDS, LAYOUT_FIELDS

INPUTS_KEY = "inputs"  # in a checkpoint's metadata and an export's export.json
INPUTS_FILE = "inputs.json"  # beside a stage's files when it has no export (comparisons)
NOT_RESULT = frozenset({"log_every", "eval_every", "checkpoint", "time_phases"})
DATA_FIELDS = frozenset({"train_path", "val_path", "normalize_path", "labeler"})
SOURCE_FIELDS = frozenset({"init_from", "policy_init", "reference_init", "reward_init", "value_init", "policies",
                           "hf_path"})
_NOT_A_SOURCE = ("gold",)  # reward_init="gold": the embedded task's gold scorer, no parameters
_SKIPPED = NOT_RESULT | (frozenset(EXECUTION_FIELDS) | frozenset(LAYOUT_FIELDS)) - SOURCE_FIELDS
_NOT_A_FILE = ("task",)  # comparisons.labeler="task": the embedded labeler, not a file


class ChangedRunError(ConfigError):
    """A stage's checkpoints or result were made from other inputs than this run's."""


def stage_inputs(env: Any, block_name: str, block: Any, *also: tuple[str, Any]) -> dict[str, Any]:
    """The inputs of stage ``env.stage`` run with ``block`` (the config block it reads,
    named ``block_name`` in messages) and the ``(name, block)`` pairs of ``also`` (what it
    reads elsewhere: an online method's ``generation.sampling``), as JSON values (a saved
    copy compares equal)."""
    where = pathlib.Path(env.tokenizer_dir).absolute()
    spec = (f"{parameters.RUN_PREFIX}{where.relative_to(env.workdir)}" if where.is_relative_to(env.workdir)
            else str(where))  # a run directory that moves keeps its inputs
    tokenizer = {"spec": spec, "sha256": files_digest(where)}
    inputs: dict[str, Any] = {"seed": env.cfg.seed, "tokenizer": tokenizer}
    inputs.update({f"tokenizer.{f.name}": getattr(env.cfg.tokenizer, f.name)  # its path: by content, above
                   for f in dataclasses.fields(env.cfg.tokenizer) if f.name != "path"})
    _walk(env, env.cfg.model, "model", inputs)
    _walk(env, block, block_name, inputs)
    for name, extra in also:
        _walk(env, extra, name, inputs)
    return json.loads(json.dumps(inputs))


def _walk(env: Any, block: Any, prefix: str, inputs: dict[str, Any]) -> None:
    for f in dataclasses.fields(block):
        value, name = getattr(block, f.name), f"{prefix}.{f.name}"
        if f.name in _SKIPPED:
            continue
        if dataclasses.is_dataclass(value):
            _walk(env, value, name, inputs)
        elif value is None:
            inputs[name] = None
        elif f.name in DATA_FIELDS and value not in _NOT_A_FILE:
            path = pathlib.Path(env.data_path(value, name))
            inputs[name] = {"spec": value, "sha256": file_digest(path)}
        elif f.name in SOURCE_FIELDS and value not in _NOT_A_SOURCE:
            specs = value if isinstance(value, tuple) else (value,)
            identities = [{"spec": spec, "sha256": source_identity(spec, name, env.workdir)} for spec in specs]
            inputs[name] = identities if isinstance(value, tuple) else identities[0]
        else:
            inputs[name] = value


def file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def files_digest(directory: pathlib.Path, pattern: str = "*") -> str:
    """SHA-256 over the relative names and contents of the files under ``directory``
    matching ``pattern`` (empty directory or none: the digest of nothing)."""
    digest = hashlib.sha256()
    if directory.is_dir():
        for path in sorted(p for p in directory.rglob(pattern) if p.is_file()):
            digest.update(str(path.relative_to(directory)).encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def _digest_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def source_identity(spec: str, field: str, workdir: pathlib.Path) -> str:
    """What a parameter source is, for a later comparison (see the module docstring). Raises
    the errors a load of ``spec`` would (nothing there, not a source)."""
    src = parameters.source(spec, field, workdir)
    if src.kind == "export":
        checkpoint.verify_export(src.path)
    if src.kind == "export" and src.meta.get(INPUTS_KEY) is not None:
        return "made from " + _digest_of(src.meta[INPUTS_KEY])
    if src.kind == "checkpoint":
        meta = checkpoint.read_step_meta(src.path)
        if meta.get(INPUTS_KEY) is not None:
            return f"step {meta.get('step')} made from " + _digest_of(meta[INPUTS_KEY])
    if src.kind == "hf":  # what parameters.load reads of it
        return files_digest(src.path, "*.json") + files_digest(src.path, "*.safetensors")
    return files_digest(src.path)


def _identity(value: Any) -> Any:
    if isinstance(value, dict) and "sha256" in value:
        return value["sha256"]
    if isinstance(value, list):
        return [_identity(v) for v in value]
    return value


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['spec']} ({value['sha256'][:12]})"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return repr(value)


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name: saved X, this run Y`` for each input that differs. Inputs only one side has
    (written by another version of rlhf_jax) are not compared."""
    out = []
    for name in sorted(set(saved) & set(current)):
        before, now = saved[name], current[name]
        if _identity(before) == _identity(now):
            continue
        if isinstance(now, dict) and isinstance(before, dict) and before.get("spec") == now.get("spec"):
            out.append(f"{name}: the content of {now['spec']} changed (SHA-256 {before['sha256'][:12]} when "
                       f"saved, {now['sha256'][:12]} now)")
        else:
            out.append(f"{name}: saved {_describe(before)}, this run {_describe(now)}")
    return out


def check_same(saved: dict[str, Any] | None, current: dict[str, Any] | None, where: pathlib.Path | str,
               stage_dir: pathlib.Path) -> None:
    """Refuses to resume or reuse ``where`` (made from ``saved`` inputs) in a run whose
    inputs are ``current``. A record without inputs (written before they were recorded)
    is not compared."""
    if saved is None or current is None:
        return
    differ = changes(saved, current)
    if differ:
        raise ChangedRunError(
            f"{where} was made from other inputs than this run's: {'; '.join(differ)}. Rerun with the inputs "
            f"it was made from, or use a new --workdir; to make it again from these, move {stage_dir} away "
            "first (nothing is deleted for you)")


def read_inputs_file(directory: pathlib.Path) -> dict[str, Any] | None:
    path = directory / INPUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def record(env: Any) -> dict[str, Any] | None:
    """``env.inputs``, computed once from the block :func:`begin` named (None: none named)."""
    if env.block is not None and env.inputs is None:
        env.inputs = stage_inputs(env, *env.block)
    return env.inputs


def begin(env: Any, block_name: str, block: Any, *also: tuple[str, Any]) -> pathlib.Path | None:
    """A stage's first step once its environment is made: names the config block it runs
    with (and ``also``, as :func:`stage_inputs`; its inputs are recorded once its data is
    validated, by ``restore_or_start``) and
    returns its export if the stage is finished and was made from the same inputs (a damaged
    export is made again, said in a warning); refuses a finished stage made from other
    inputs. None: the stage has to run (or resume)."""
    import sys

    env.block = (block_name, block, *also)
    export_dir = env.stage_dir / "export"
    if not (export_dir / checkpoint.EXPORT_META).is_file():
        return None
    check_same(checkpoint.read_export_meta(export_dir).get(INPUTS_KEY), record(env), export_dir, env.stage_dir)
    damage = checkpoint.export_damage(export_dir)
    if damage is None:
        return export_dir
    print(f"rlhf-jax: warning: {export_dir} is damaged ({damage}); exporting it again from the stage's last "
          "checkpoint", file=sys.stderr)
    return None


def export(env: Any, params: Any, extra: dict[str, Any]) -> pathlib.Path:
    """Writes the stage's export, its inputs recorded in ``export.json``."""
    return checkpoint.export_params(env.stage_dir / "export", params, env.cfg.model,
                                    {**extra, INPUTS_KEY: record(env)})
