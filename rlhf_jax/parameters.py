"""Where a model's parameters come from, in one place.

- :func:`create`: random, born sharded on the mesh.
- :func:`abstract`: ShapeDtypeStructs with shardings, the target every restore lands on.
- :func:`load`: by a *spec*, ``run:<path>`` inside the run directory or a path, naming one of
  - an export (a directory with ``export.json``, written at the end of each stage);
  - a Hugging Face checkpoint directory (``config.json`` and ``*.safetensors``);
  - a stage's Orbax checkpoints (``<stage>/checkpoints``: the newest intact step, or
    ``<stage>/checkpoints/<step>``), of which only the params are read.
- :func:`initial`: what a stage starts from (a spec, else fresh).

Every load first checks that the source holds the same model (one rule:
``config.architecture_differences``) and names the fields that differ. Params always land
shaped and sharded as the target model on the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import ConfigError, LoRAConfig, ModelConfig
from rlhf_jax.config.model import model_config_from_dict
from rlhf_jax.models import lora

RUN_PREFIX = "run:"


def resolve(spec: str, workdir: str | pathlib.Path | None) -> pathlib.Path:
    """``run:<relative path>`` is inside ``workdir``; anything else is a path."""
    if spec.startswith(RUN_PREFIX):
        if workdir is None:
            raise ConfigError(f"{spec!r}: a run: path needs a run directory")
        return pathlib.Path(workdir) / spec[len(RUN_PREFIX):]
    return pathlib.Path(spec)


def create(model: nn.Module, mesh: Mesh, rng: jax.Array) -> tuple[Any, Any]:
    """``model``'s parameters drawn from ``rng``, created directly in their shards.
    Returns (params, shardings)."""
    tokens = sharding.sample_tokens(mesh)

    def init(key):
        return model.init(key, tokens)["params"]

    with sharding.activate(mesh):
        sharding.check_all_partitioned(jax.eval_shape(init, rng))
    return sharding.sharded_create(init, mesh, rng)


def abstract(model: nn.Module, mesh: Mesh) -> Any:
    """ShapeDtypeStructs (with shardings) of ``model``'s params: a restore target."""
    tokens = sharding.sample_tokens(mesh)
    with sharding.activate(mesh):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
    return checkpoint.abstract_like(sharding.strip_boxes(boxed), sharding.logical_shardings(boxed, mesh))


def shardings_of(params: Any) -> Any:
    """The sharding of every leaf of placed ``params``."""
    return jax.tree.map(lambda x: x.sharding, params)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a spec names: ``kind`` is export, hf or checkpoint; ``model`` the architecture
    stored there; ``meta`` the export's ``export.json`` (empty for the others); ``scalar``:
    the params are a scalar (reward or value) model's, with a ``head`` and no LM head."""

    kind: str
    path: pathlib.Path
    model: ModelConfig
    meta: dict[str, Any]
    scalar: bool


def source(spec: str, field: str, workdir: str | pathlib.Path | None = None) -> Source:
    """Finds what ``spec`` names (``field``: the config field or flag, for errors)."""
    path = resolve(spec, workdir).absolute()
    if not path.exists():
        raise ConfigError(f"{field}={spec!r}: nothing at {path} (did the stage that writes it finish?)")
    if (path / checkpoint.EXPORT_META).is_file():
        meta = checkpoint.read_export_meta(path)
        return Source("export", path, checkpoint.export_model_config(path), meta, meta.get("stage") == "rm")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        from rlhf_jax.models.hf_config import model_config_from_hf

        return Source("hf", path, model_config_from_hf(path), {}, False)
    step_dir = _checkpoint_step(path)
    if step_dir is not None:
        meta = checkpoint.read_step_meta(step_dir)
        saved = meta.get("config", {}).get("model")
        if saved is None:
            raise checkpoint.CheckpointError(f"{step_dir}: its metadata names no model config")
        scalar = "head" in checkpoint.read_step_state_metadata(step_dir).get("params", {})
        return Source("checkpoint", step_dir, model_config_from_dict(saved, f"{step_dir} (meta)"), {}, scalar)
    raise ConfigError(f"{field}={spec!r}: {path} is not an export (no {checkpoint.EXPORT_META}), a HF checkpoint "
                      "(config.json and *.safetensors) or a stage's checkpoints directory")


def _checkpoint_step(path: pathlib.Path) -> pathlib.Path | None:
    """``path`` itself if it is one finished checkpoint step, else the newest intact step of
    the checkpoints directory ``path`` (None: neither)."""
    if path.name.isdigit() and (path / "state").is_dir():
        return path
    steps = checkpoint.finished_steps(path)
    for step in reversed(steps):
        if checkpoint.step_damage(path / str(step)) is None:
            return path / str(step)
    if steps:
        raise checkpoint.CheckpointError(f"{path}: every checkpoint is damaged (steps {steps})")
    return None


def load(spec: str, model: nn.Module, mesh: Mesh, field: str, workdir: str | pathlib.Path | None = None,
         adapter_rng: jax.Array | None = None) -> tuple[Any, Source]:
    """``model``'s params from what ``spec`` names, on ``mesh``. Refuses another
    architecture, naming the fields. Returns (params, source).

    LoRA (``model.cfg.lora``): exports and HF checkpoints hold plain weights, which become
    the frozen base under fresh adapters drawn from ``adapter_rng`` (default: key 0). A
    stage's checkpoints may hold adapters: with this model's settings they load as they
    are; otherwise they are folded into their base first (e.g. ``convert --to-hf`` of a
    LoRA stage's checkpoints)."""
    src = source(spec, field, workdir)
    stored = src.model.lora
    if stored.enabled:  # a LoRA training state's params: base + adapters
        params = _load_stored(src, model.clone(cfg=dataclasses.replace(model.cfg, lora=stored)), mesh, field, spec)
        if stored == model.cfg.lora:
            return params, src
        params = _fold_adapters(params, stored.scaling, abstract(_without_adapters(model), mesh))
    else:
        params = _load_stored(src, _without_adapters(model), mesh, field, spec)
    if model.cfg.lora.enabled:
        params = lora.merge(params, fresh_adapters(model, mesh, jax.random.PRNGKey(0) if adapter_rng is None
                                                   else adapter_rng))
    return params, src


def _without_adapters(model: nn.Module) -> nn.Module:
    return model.clone(cfg=dataclasses.replace(model.cfg, lora=LoRAConfig()))


def _fold_adapters(params: Any, scaling: float, target: Any) -> Any:
    """``params`` with their adapters merged into the kernels, placed as ``target``."""
    return jax.jit(lambda p: lora.merge_adapters(p, scaling), out_shardings=shardings_of(target))(params)


def fresh_adapters(model: nn.Module, mesh: Mesh, rng: jax.Array) -> Any:
    """The adapters of a fresh ``model`` (``lora_a`` drawn from ``rng``, ``lora_b`` zero),
    born sharded; the base weights the same init would draw are never computed."""
    tokens = sharding.sample_tokens(mesh)
    params, _ = sharding.sharded_create(lambda key: lora.adapter_params(model.init(key, tokens)["params"]), mesh, rng)
    return params


def _load_stored(src: Source, model: nn.Module, mesh: Mesh, field: str, spec: str) -> Any:
    """The params ``src`` stores, for ``model`` (whose adapters, if any, are the stored ones)."""
    target = abstract(model, mesh)
    if src.kind == "export":
        return checkpoint.load_export(src.path, target, model.cfg)
    stored = src.model
    if src.kind == "hf":  # HF tensors are cast on load; a RoPE model has no position table
        stored = dataclasses.replace(stored, param_dtype=model.cfg.param_dtype,
                                     max_len=model.cfg.max_len if stored.family == "llama" else stored.max_len)
    checkpoint.check_same_model(stored, model.cfg, f"{field}={spec!r} ({src.path})")
    if src.kind == "hf":
        from rlhf_jax.models.hf import load_hf_params

        if "backbone" not in target or "head" in target:  # a scalar model: see initial()
            raise ConfigError(f"{field}={spec!r}: a HF checkpoint holds a language model, not a {type(model).__name__}")
        return load_hf_params(src.path, model.cfg, target)
    return _restore_checkpoint_params(src.path, target)


def _restore_checkpoint_params(step_dir: pathlib.Path, target: Any) -> Any:
    """The ``params`` of the TrainState saved in checkpoint ``step_dir`` (its optimiser
    state is not read), onto ``target``'s shardings."""
    differ = checkpoint.differences(checkpoint.read_step_state_metadata(step_dir).get("params"), target)
    if differ:
        raise checkpoint.CheckpointError(f"{step_dir}: its params do not match this model: {len(differ)} arrays "
                                         f"differ, e.g. {'; '.join(differ[:3])}")
    item = {"params": target}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    return restored["params"]


def scalar_head_rng(seed: int) -> jax.Array:
    """The key a scalar (reward or value) model's fresh weights are drawn from."""
    return jax.random.PRNGKey(seed + 1)


def lora_adapter_rng(seed: int) -> jax.Array:
    """The key a run's fresh LoRA adapters are drawn from."""
    return jax.random.PRNGKey(seed + 2)


def initial(model: nn.Module, mesh: Mesh, spec: str | None, field: str, workdir: str | pathlib.Path | None,
            rng: jax.Array | None = None, adapter_rng: jax.Array | None = None) -> Any | None:
    """The params a stage starts from.

    A language model: what ``spec`` names, or None without one (the train state draws them).
    A scalar (reward or value) model, ``rng`` given: a scalar model's source as it is; a
    language model's source gives its backbone under the fresh (zero) head drawn from
    ``rng``; no spec gives the fresh model. ``adapter_rng`` draws the fresh LoRA adapters
    a model with ``model.lora`` gets on stored weights (see :func:`load`).
    """
    if rng is None:
        return None if spec is None else load(spec, model, mesh, field, workdir, adapter_rng)[0]
    if spec is not None and source(spec, field, workdir).scalar:
        return load(spec, model, mesh, field, workdir, adapter_rng)[0]
    fresh, _ = create(model, mesh, rng)
    if spec is None:
        return fresh
    from rlhf_jax.models import LanguageModel

    lm, _ = load(spec, LanguageModel(model.cfg), mesh, field, workdir, adapter_rng)
    return dict(fresh, backbone=lm["backbone"])
