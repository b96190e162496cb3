"""Orbax checkpoints for resuming a stage, and exports that hand params to the next stage.

``<workdir>/<stage>/checkpoints``: a ``CheckpointManager`` with two items, ``state`` (the
whole TrainState, sharded) and ``meta`` (JSON: data position, the resolved config). A
rerun of the same command restores the latest step onto the current mesh.

``<workdir>/<stage>/export``: ``params/`` (Orbax) and ``export.json`` (model config and any
stage extras, e.g. the reward normalisation). Exports are always restored with a target,
so they land on whatever mesh the next stage runs on.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax.config import CheckpointConfig, ModelConfig

EXPORT_META = "export.json"


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used for this run; names the path."""


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class StageCheckpoints:
    """Keeps the newest ``cfg.keep`` checkpoints of one stage."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=True)
        # handlers named up front, so metadata can be read before a restore is attempted
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default: latest) shaped and sharded like ``target_state``
        (arrays or ShapeDtypeStructs with shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
        # A restore that fails midway leaves Orbax's reads running past its closed event loop
        # (pages of "Event loop is closed"): compare shapes from the metadata first.
        differ = _differences(self.manager.item_metadata(step)["state"], target)
        if differ:
            raise CheckpointError(
                f"{self.directory}/{step}: does not match this run's state (was it written by a "
                f"different model config?): {len(differ)} arrays differ, e.g. {'; '.join(differ[:3])}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{self.directory}/{step}: does not match this run's state (was it written by a "
                f"different model config?): {err}") from err
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _differences(saved: Any, target: Any) -> list[str]:
    """``name: stored shape, this run shape`` for each array that differs (params first)."""
    stored = ocp.tree.to_flat_dict(saved, sep=".")
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(target, keep_empty_nodes=True), sep=".")
    shape = lambda leaf: tuple(leaf.shape) if leaf is not None and hasattr(leaf, "shape") else None  # noqa: E731
    names = sorted(set(stored) | set(wanted), key=lambda k: (not k.startswith("params."), k))
    return [f"{k}: stored {shape(stored.get(k)) if k in stored else 'nothing'}, this run "
            f"{shape(wanted.get(k)) if k in wanted else 'nothing'}"
            for k in names if k not in stored or k not in wanted or shape(stored[k]) != shape(wanted[k])]


def finished_steps(directory: str | pathlib.Path) -> list[int]:
    """Steps of the finished checkpoints in ``directory`` (Orbax writes a step under a
    temporary name and renames it when done), oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def export_params(directory: str | pathlib.Path, params: Any, model_cfg: ModelConfig,
                  extra: dict[str, Any] | None = None) -> pathlib.Path:
    """Writes ``params`` and their model config; replaces an older export atomically-enough
    (a new export is written beside it and renamed over it)."""
    directory = pathlib.Path(directory).absolute()
    staging = directory.with_name(directory.name + ".tmp")
    primary = jax.process_index() == 0  # with several processes, only process 0 moves files
    if primary:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    _sync_processes("rlhf_jax export: staging directory made")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(staging / "params", params)  # every process writes its shards
    meta = {"model": dataclasses.asdict(model_cfg), **(extra or {})}
    if primary:
        (staging / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    _sync_processes("rlhf_jax export: renamed into place")  # no process reads it any earlier
    return directory


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_export_meta(directory: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(directory) / EXPORT_META
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an export (no {EXPORT_META}); did the stage finish?")
    return json.loads(path.read_text())


def export_model_config(directory: str | pathlib.Path) -> ModelConfig:
    """The architecture an export was written for (its ``export.json``)."""
    saved = read_export_meta(directory)["model"]
    try:
        return ModelConfig(**saved)
    except TypeError as err:
        raise CheckpointError(f"{directory}: the model config in {EXPORT_META} is not valid: {err}") from err


def load_export(directory: str | pathlib.Path, target_params: Any,
                model_cfg: ModelConfig | None = None) -> Any:
    """Restores exported params shaped and sharded like ``target_params`` (arrays or
    ShapeDtypeStructs). With ``model_cfg``, first checks the export was made for the same
    architecture and names the fields that differ."""
    directory = pathlib.Path(directory).absolute()
    meta = read_export_meta(directory)
    if model_cfg is not None:
        saved = meta["model"]
        ignore = {"dropout", "remat", "compute_dtype", "attention_impl", "hf_path"}
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(model_cfg).items()
                if k not in ignore and saved.get(k) != v}
        if diff:
            raise CheckpointError(f"{directory}: exported for a different model; (export, config) "
                                  f"differ in {diff}")
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_params)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory / "params", target)
