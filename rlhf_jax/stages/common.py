"""What every stage shares: run directory, mesh, tokenizer, data paths, initial params, and
state resume (the loop itself is in :mod:`rlhf_jax.stages.loop`). No maths here."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

from rlhf_jax import checkpoint, parameters, sharding
from rlhf_jax.config import CheckpointConfig, Config, ConfigError, ModelConfig, save_config
from rlhf_jax.config.model import model_config_from_dict
from rlhf_jax.data import load_tokenizer
from rlhf_jax.host import use_compilation_cache
from rlhf_jax.models import lora
from rlhf_jax.sizing import check_fits

TASK_PREFIX = "task:"


@dataclasses.dataclass
class StageEnv:
    """The run-wide context a stage works in."""

    cfg: Config  # the run's config, with ``model`` set to this stage's architecture
    workdir: pathlib.Path
    stage: str
    mesh: Any
    tokenizer: Any
    run_cfg: Config | None = None  # the run's config as given (None: ``cfg``); saved as <workdir>/config.json
    tokenizer_dir: pathlib.Path | None = None
    # (name, config block) the stage runs with (provenance.begin); what its result depends on
    # (provenance.record, at restore_or_start), saved with each checkpoint and the export
    block: tuple[Any, ...] | None = None  # (name, block, *(name, block) it also reads)
    inputs: dict[str, Any] | None = None

    @property
    def stage_dir(self) -> pathlib.Path:
        return self.workdir / self.stage

    @property
    def cache_dir(self) -> str:
        return str(self.workdir / "data" / "cache")

    @property
    def process(self) -> dict[str, int]:
        return {"process_index": jax.process_index(), "process_count": jax.process_count()}

    def batches(self, batches_cls: type, spec: str, field: str, data_cfg: Any, **options: Any) -> Any:
        """``batches_cls`` (a ``rlhf_jax.data`` batch source) over the file ``spec`` names
        (see :meth:`data_path`; ``field`` names the config field in errors), with this run's
        tokenizer, seed, cache directory and this process's share of every batch."""
        return batches_cls(self.data_path(spec, field), self.tokenizer, data_cfg, seed=self.cfg.seed,
                           cache_dir=self.cache_dir, **self.process, **options)

    def resolve(self, spec: str) -> pathlib.Path:
        """``run:<relative path>`` is inside the run directory; anything else is a path."""
        return parameters.resolve(spec, self.workdir)

    def load_params(self, spec: str, model: Any, field: str) -> tuple[Any, parameters.Source]:
        """``model``'s params from the export, HF or checkpoint directory ``spec`` names, on
        this run's mesh (see :func:`rlhf_jax.parameters.load`; with ``model.lora``, fresh
        adapters on the stored weights)."""
        return parameters.load(spec, model, self.mesh, field, self.workdir, parameters.lora_adapter_rng(self.cfg.seed))

    def initial_params(self, model: Any, init_from: str | None, field: str, rng: Any = None) -> Any | None:
        """What a stage's ``model`` starts from: ``init_from`` (a spec; ``field`` names it),
        else the HF checkpoint ``model.hf_path``, else fresh weights (see
        :func:`rlhf_jax.parameters.initial`: ``rng`` draws a scalar model's fresh head).
        With ``model.lora`` there must be weights to adapt: fresh ones are refused."""
        if init_from is None and self.cfg.model.hf_path:
            init_from, field = self.cfg.model.hf_path, "model.hf_path"
        if init_from is None and model.cfg.lora.enabled:
            raise ConfigError(f"model.lora.rank={model.cfg.lora.rank}: LoRA trains adapters on trained weights, but "
                              f"{field} and model.hf_path are unset, so stage {self.stage} would adapt random "
                              "weights; name a base model, or set model.lora.rank=0")
        return parameters.initial(model, self.mesh, init_from, field, self.workdir, rng,
                                  parameters.lora_adapter_rng(self.cfg.seed))

    def data_path(self, spec: str, field: str) -> str:
        """A JSONL path, ``run:<path>`` inside the run directory, or ``task:<split>`` for a
        split of the embedded task (written into ``<workdir>/data/task`` on first use)."""
        if spec.startswith(TASK_PREFIX):
            from rlhf_jax.tasks import SPLITS

            split = spec[len(TASK_PREFIX):]
            if split not in SPLITS:
                raise ConfigError(f"{field}={spec!r}: the embedded task has splits {list(SPLITS)}")
            return str(task_files(self.workdir, self.cfg.seed)[split])
        path = self.resolve(spec)
        if not path.is_file():
            raise ConfigError(f"{field}={spec!r}: no such file ({path})")
        return str(path)


def task_files(workdir: pathlib.Path, seed: int) -> dict[str, pathlib.Path]:
    """The embedded task's files in ``<workdir>/data/task``, written on first use. Files of
    another seed are not rewritten: the stages trained on them would be evaluated on, or
    resumed with, data they never saw."""
    import json

    from rlhf_jax.tasks import write_task_files
    from rlhf_jax.tasks.files import MANIFEST

    out = workdir / "data" / "task"
    try:
        written = json.loads((out / MANIFEST).read_text())["settings"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unfinished: (re)written below
        written = seed
    if written != seed:
        raise ConfigError(f"seed={seed}: {out} holds the embedded task made with seed {written}, which the "
                          f"stages in {workdir} were trained on; rerun with --seed={written}, or use a new --workdir")
    return write_task_files(out, seed=seed)


def quiet_tfds() -> None:
    """TFDS prints progress bars and 'Downloading and preparing' for every local store it
    builds; our own progress bar says what is happening."""
    import absl.logging
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    absl.logging.set_verbosity(absl.logging.ERROR)


AUTO_CACHE = "run:xla_cache"  # where compilation_cache_dir="auto" puts the cache on an accelerator


def compilation_cache_directory(setting: str | None, backend: str, workdir: pathlib.Path) -> pathlib.Path | None:
    """Where ``Config.compilation_cache_dir`` puts the persistent compilation cache, None
    for off: ``"auto"`` is :data:`AUTO_CACHE` on an accelerator backend (``gpu``, ``cuda``,
    ``rocm``, ``tpu``) and off on ``cpu``; otherwise a path as :func:`parameters.resolve`
    reads it. Pure, so every case is testable on CPU."""
    if not setting or (setting == "auto" and backend == "cpu"):
        return None
    return parameters.resolve(AUTO_CACHE if setting == "auto" else setting, workdir)


def make_env(cfg: Config, workdir: str | pathlib.Path, stage: str, model: ModelConfig | None = None) -> StageEnv:
    """Validates what can be checked before data is read: mesh vs devices, tokenizer vs
    model vocabulary. ``model``: this stage's architecture when it is not ``cfg.model``
    (the pipeline's larger reward-model base); ``env.cfg.model`` is then ``model``."""
    run_cfg = cfg
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    cfg.validate()
    quiet_tfds()
    workdir = pathlib.Path(workdir).absolute()
    cache = compilation_cache_directory(cfg.compilation_cache_dir, jax.default_backend(), workdir)
    if cache is not None:
        use_compilation_cache(cache)
    mesh = sharding.make_mesh(cfg.mesh)
    check_fits(cfg.model, mesh)  # before the task files or anything else is written
    if cfg.tokenizer.kind == "task":
        tokenizer_dir = task_files(workdir, cfg.seed)["tokenizer"]
    else:
        if not cfg.tokenizer.path:
            raise ConfigError("tokenizer.path must name a local tokenizer directory when tokenizer.kind='hf'")
        tokenizer_dir = pathlib.Path(cfg.tokenizer.path)
    tokenizer = load_tokenizer(tokenizer_dir, cfg.tokenizer.chat_template)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    return StageEnv(cfg=cfg, workdir=workdir, stage=stage, mesh=mesh, tokenizer=tokenizer, run_cfg=run_cfg,
                    tokenizer_dir=tokenizer_dir)


def restore_or_start(env: StageEnv, ckpt_cfg: CheckpointConfig, state: Any,
                     ) -> tuple[checkpoint.StageCheckpoints, Any, int]:
    """Opens the stage's checkpoints (creating the directory) and resumes from the latest.

    Call only after inputs are validated: a run that fails validation writes nothing here.
    Returns (checkpoints, state, first step to run).
    """
    from rlhf_jax import provenance

    provenance.record(env)  # the stage's data is validated by now
    ckpts = checkpoint.StageCheckpoints(env.stage_dir / "checkpoints", ckpt_cfg)

    def same_model(step: int, meta: dict[str, Any]) -> None:
        saved_model = meta.get("config", {}).get("model")
        where = f"{ckpts.directory}/{step}"
        if saved_model:  # a training state is not converted between layouts: scan_layers counts
            checkpoint.check_same_model(model_config_from_dict(saved_model, f"{where} (meta)"), env.cfg.model,
                                        where, include_layout=True)
        provenance.check_same(meta.get(provenance.INPUTS_KEY), env.inputs, where, env.stage_dir)

    # a damaged newest step falls back to an older one
    saved = ckpts.restore_newest_intact(state, check_meta=same_model)
    if saved is None:
        return ckpts, state, 0
    state, meta = saved
    return ckpts, state, int(meta["step"])


def trainable_summary(params: Any, opt_state: Any) -> dict[str, int]:
    """What a stage trains with ``model.lora`` (metrics at its first step): parameters
    trained (the adapters and a scalar head) and in all, and the optimiser state's bytes.
    Empty without adapters: a full fine-tuning run's metrics stay as they were."""
    if not lora.has_adapters(params):
        return {}
    trainable, frozen = lora.split_trainable(params)
    n_trainable = lora.count_params(trainable)
    return {"params/trainable": n_trainable, "params/total": n_trainable + lora.count_params(frozen),
            "optim/state_bytes": lora.tree_bytes(opt_state)}


def export_adapter(env: StageEnv, params: Any, base_spec: str | None) -> pathlib.Path | None:
    """With ``model.lora``: ``params``' adapters as a PEFT adapter in ``<stage>/adapter``, for
    the base model ``base_spec`` names (written before the stage's export, which marks the
    stage finished). None without adapters."""
    if not env.cfg.model.lora.enabled:
        return None
    from rlhf_jax.models.peft import export_peft

    base = str(env.resolve(base_spec).absolute()) if base_spec else ""
    return export_peft(params, env.cfg.model, env.stage_dir / "adapter", base)


def write_run_config(env: StageEnv) -> None:
    if jax.process_index() == 0:
        save_config(env.run_cfg or env.cfg, env.workdir / "config.json")
        save_config(env.cfg, env.stage_dir / "config.json")
