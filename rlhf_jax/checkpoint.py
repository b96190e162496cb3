"""Orbax checkpoints for resuming a stage, and exports that hand params to the next stage.

``<workdir>/<stage>/checkpoints``: a ``CheckpointManager`` with two items, ``state`` (the
whole TrainState, sharded) and ``meta`` (JSON: data position, the resolved config). A
rerun of the same command restores the latest step onto the current mesh.

``<workdir>/<stage>/export``: ``params/`` (Orbax), ``export.json`` (model config and any
stage extras, e.g. the reward normalisation) and ``rlhf_jax_checksums.json`` (CRC32 of every
other file, checked before each load). Exports are always restored with a target, so they
land on whatever mesh the next stage runs on.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from rlhf_jax import models
from rlhf_jax.models import vocab
from rlhf_jax.atomic import write_text
from rlhf_jax.config import CheckpointConfig, ModelConfig
from rlhf_jax.config.model import architecture_differences, model_config_from_dict

EXPORT_META = "export.json"


CHECKSUMS = "rlhf_jax_checksums.json"  # in each finished step directory: file -> CRC32


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used for this run; names the path."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files changed or went missing after it was written; names the step."""


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
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._seal()  # the previous save must finish before this one starts anyway
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Writes the checksums of every finished save (process 0; files are on a shared disk)."""
        if not self._unsealed:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                if step_dir.is_dir():  # not yet pruned by ``keep``
                    write_text(step_dir / CHECKSUMS, json.dumps(_file_sums(step_dir), indent=0, sort_keys=True))
        self._unsealed = []

    def damage(self, step: int) -> str | None:
        """What is wrong with finished checkpoint ``step`` on disk (see :func:`step_damage`)."""
        return step_damage(self.directory / str(step))

    def restore_newest_intact(self, target_state: Any, check_meta: Callable[[int, dict[str, Any]], None] | None = None,
                              ) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that is not damaged (None: there is none yet).
        A damaged newer one is named in a warning and moved to ``<stage>/damaged_checkpoints``
        (nothing is deleted); if every checkpoint is damaged, stops naming them."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(target_state, step, check_meta)
            except DamagedCheckpointError as err:
                damaged.append(step)
                print(f"rlhf-jax: warning: {err}; moved to {self._set_aside(step)}, trying an older step",
                      file=sys.stderr)
        if damaged:
            raise CheckpointError(f"{self.directory}: every checkpoint is damaged (steps {damaged}, now in "
                                  f"{self.directory.parent / 'damaged_checkpoints'}); rerun to start this "
                                  "stage from step 0")
        return None

    def _set_aside(self, step: int) -> pathlib.Path:
        aside = self.directory.parent / "damaged_checkpoints" / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                shutil.rmtree(aside)
            shutil.move(self.directory / str(step), aside)
        _sync_processes(f"rlhf_jax checkpoint {step} set aside")
        self.manager.reload()
        return aside

    def restore(self, target_state: Any, step: int | None = None,
                check_meta: Callable[[int, dict[str, Any]], None] | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default: latest) shaped and sharded like ``target_state``
        (arrays or ShapeDtypeStructs with shardings). ``check_meta(step, meta)`` may refuse
        the step from its saved metadata before any array is compared or read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
        why = self.damage(step)
        if why:
            raise DamagedCheckpointError(f"{self.directory}/{step} is damaged: {why}")
        if check_meta is not None:
            check_meta(step, read_step_meta(self.directory / str(step)))
        # A restore that fails midway leaves Orbax's reads running past its closed event loop
        # (pages of "Event loop is closed"): compare shapes from the metadata first.
        differ = differences(self.manager.item_metadata(step)["state"], target)
        if differ:
            raise CheckpointError(
                f"{self.directory}/{step}: does not match this run's state (was it written by a "
                f"different model config?): {len(differ)} arrays differ, e.g. {'; '.join(differ[:3])}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - shapes matched, so the files are bad
            raise DamagedCheckpointError(f"{self.directory}/{step} is damaged: Orbax could not read it "
                                         f"({type(err).__name__}: {str(err)[:300]})") from err
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()


def checksum_damage(directory: pathlib.Path) -> str | None:
    """Which file of ``directory`` is missing or changed since its ``rlhf_jax_checksums.json``
    was written (None: none, or no checksums to compare)."""
    sums_path = directory / CHECKSUMS
    if not sums_path.is_file():
        return None
    try:
        saved = json.loads(sums_path.read_text())
    except ValueError:
        return f"its {CHECKSUMS} is not valid JSON"
    now = _file_sums(directory)
    for name in sorted(saved):
        if name not in now:
            return f"{name} is missing"
        if now[name] != saved[name]:
            return f"{name} changed since it was written (checksum mismatch)"
    return None


def step_damage(step_dir: pathlib.Path) -> str | None:
    """What is wrong with the finished checkpoint ``step_dir`` on disk, or None: a file
    missing or changed since its checksums were written (they are absent only if the run
    died between a save and its seal), or Orbax's metadata unreadable."""
    why = checksum_damage(step_dir)
    if why:
        return why
    try:
        read_step_state_metadata(step_dir)
    except Exception as err:  # noqa: BLE001 - any failure to read the metadata is damage
        return f"Orbax cannot read its metadata ({type(err).__name__}: {str(err)[:300]})"
    return None


def read_step_state_metadata(step_dir: pathlib.Path) -> dict[str, Any]:
    """The saved TrainState's tree of array metadata (shapes, dtypes) in checkpoint ``step_dir``."""
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(step_dir / "state").item_metadata
    if tree is None:
        raise CheckpointError(f"{step_dir}: Orbax finds no state metadata in it")
    return tree.tree


def read_step_meta(step_dir: pathlib.Path) -> dict[str, Any]:
    """The JSON saved beside the state in checkpoint ``step_dir`` (step, resolved config)."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(step_dir / "meta")


def check_same_model(saved: ModelConfig, current: ModelConfig, where: str, include_layout: bool = False) -> None:
    """Refuses params written for another architecture, naming each field that differs
    (``config.architecture_differences`` is the rule)."""
    diff = architecture_differences(saved, current, include_layout)
    if diff:
        listed = "; ".join(f"model.{k}: saved {a!r}, this run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{where}: written for a different model ({listed}); use the original model "
                              "config, or a new --workdir")


def _file_sums(step_dir: pathlib.Path) -> dict[str, int]:
    """CRC32 of every file under ``step_dir`` (but the checksums themselves), by relative path."""
    sums = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(CHECKSUMS):
            crc = 0
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            sums[str(path.relative_to(step_dir))] = crc
    return sums


def differences(saved: Any, target: Any) -> list[str]:
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
    (a new export is written beside it and renamed over it). A padded vocabulary
    (``model.vocab_pad_multiple``) is stored at its real size."""
    params = vocab.unpad_vocab(params, model_cfg)
    directory = pathlib.Path(directory).absolute()
    refuse_to_replace(directory)
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
        write_text(staging / EXPORT_META, json.dumps(meta, indent=2, sort_keys=True))
        write_text(staging / CHECKSUMS, json.dumps(_file_sums(staging), indent=0, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    _sync_processes("rlhf_jax export: renamed into place")  # no process reads it any earlier
    return directory


def refuse_to_replace(directory: pathlib.Path) -> None:
    """An export replaces its directory whole, so that directory must be absent, empty or an
    export already: anything else is someone's files, which are never deleted."""
    if directory.is_file():
        raise CheckpointError(f"{directory}: is a file, not a directory; an export needs a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / EXPORT_META).is_file():
        raise CheckpointError(f"{directory}: holds files that are not an export (no {EXPORT_META}); "
                              "refusing to replace it: choose a new or empty directory")


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_export_meta(directory: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(directory) / EXPORT_META
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an export (no {EXPORT_META}); did the stage finish?")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the export is damaged"
                              + (f" ({export_damage(path.parent)})" if export_damage(path.parent) else "")) from None


def export_damage(directory: str | pathlib.Path) -> str | None:
    """What is wrong with an export on disk (a file missing or changed since it was written),
    None if nothing is, or if it has no checksums (written before exports had them)."""
    return checksum_damage(pathlib.Path(directory))


def verify_export(directory: str | pathlib.Path) -> None:
    """Refuses a damaged export, naming the file."""
    why = export_damage(directory)
    if why:
        raise CheckpointError(f"{directory} is damaged: {why}; rerun the stage that wrote it (it exports again "
                              "from its last checkpoint), or restore the export from a copy")


def export_model_config(directory: str | pathlib.Path) -> ModelConfig:
    """The architecture an export was written for (its ``export.json``, read strictly)."""
    try:
        return model_config_from_dict(read_export_meta(directory)["model"], f"{directory}/{EXPORT_META}")
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def load_export(directory: str | pathlib.Path, target_params: Any,
                model_cfg: ModelConfig | None = None) -> Any:
    """Restores exported params shaped and sharded like ``target_params`` (arrays or
    ShapeDtypeStructs). With ``model_cfg``, first checks the export was made for the same
    architecture and names the fields that differ."""
    directory = pathlib.Path(directory).absolute()
    verify_export(directory)
    saved_cfg = export_model_config(directory)
    if model_cfg is not None:  # scan_layers is a layout, not architecture: converted below
        check_same_model(saved_cfg, model_cfg, f"{directory} (export)")
    padded = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_params)
    # exports hold the real vocabulary: restore that, then pad to the target's rows
    target = vocab.real_vocab_target(padded, saved_cfg)
    return vocab.pad_vocab(_restore_layout(directory, target, saved_cfg, model_cfg), padded)


def _restore_layout(directory: pathlib.Path, target: Any, saved_cfg: ModelConfig,
                    model_cfg: ModelConfig | None) -> Any:
    """The export's params restored onto ``target``, converted from the export's layer
    layout (``scan_layers``) to the target's."""
    saved_stacked = saved_cfg.stacked
    want_stacked = models.is_stacked(target)
    if model_cfg is not None and want_stacked is not None and want_stacked != model_cfg.stacked:
        raise CheckpointError(f"{directory}: target params are {'stacked' if want_stacked else 'unrolled'} "
                              f"but model.scan_layers={model_cfg.scan_layers!r} ({model_cfg.n_layers} layers)")
    if want_stacked is None or want_stacked == saved_stacked:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(directory / "params", target)
    # the export's model.scan_layers differs from the target's layout: restore the export's
    # layout (each leaf sharded as the target's, less or plus the unsharded layer axis), convert
    n_layers = saved_cfg.n_layers
    if want_stacked:
        as_saved = models.unstack_layers(target, n_layers, lambda leaf, i: jax.ShapeDtypeStruct(
            leaf.shape[1:], leaf.dtype, sharding=_layer_axis_sharding(leaf.sharding, drop=True)))
    else:
        as_saved = models.stack_layers(target, lambda leaves: jax.ShapeDtypeStruct(
            (len(leaves), *leaves[0].shape), leaves[0].dtype,
            sharding=_layer_axis_sharding(leaves[0].sharding, drop=False)))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "params", as_saved)
    converted = models.stack_layers(restored) if want_stacked else models.unstack_layers(restored, n_layers)
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if t.sharding is not None else x,
                        converted, target)


def _layer_axis_sharding(s: Any, drop: bool) -> Any:
    """``s`` (a stacked leaf's sharding) less its leading layer axis, or plus one (unsharded)."""
    if not isinstance(s, jax.sharding.NamedSharding):
        return s
    spec = tuple(s.spec)
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*(spec[1:] if drop else (None, *spec))))
