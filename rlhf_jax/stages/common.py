"""What every stage loop shares: run directory, mesh, tokenizer, data paths, state
creation or resume, and the train loop skeleton. No maths here."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils

from rlhf_jax import checkpoint, parameters, sharding
from rlhf_jax.config import CheckpointConfig, Config, ConfigError, ModelConfig, save_config, to_dict
from rlhf_jax.config.model import model_config_from_dict
from rlhf_jax.data import load_tokenizer, to_global
from rlhf_jax.host import use_compilation_cache
from rlhf_jax.logging import MetricsLogger

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
        this run's mesh (see :func:`rlhf_jax.parameters.load`)."""
        return parameters.load(spec, model, self.mesh, field, self.workdir)

    def initial_params(self, model: Any, init_from: str | None, field: str, rng: Any = None) -> Any | None:
        """What a stage's ``model`` starts from: ``init_from`` (a spec; ``field`` names it),
        else the HF checkpoint ``model.hf_path``, else fresh weights (see
        :func:`rlhf_jax.parameters.initial`: ``rng`` draws a scalar model's fresh head)."""
        if init_from is None and self.cfg.model.hf_path:
            init_from, field = self.cfg.model.hf_path, "model.hf_path"
        return parameters.initial(model, self.mesh, init_from, field, self.workdir, rng)

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
    from rlhf_jax.tasks import write_task_files

    return write_task_files(workdir / "data" / "task", seed=seed)


def quiet_tfds() -> None:
    """TFDS prints progress bars and 'Downloading and preparing' for every local store it
    builds; our own progress bar says what is happening."""
    import absl.logging
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    absl.logging.set_verbosity(absl.logging.ERROR)


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
    if cfg.compilation_cache_dir:
        cache = cfg.compilation_cache_dir
        use_compilation_cache(workdir / cache[4:] if cache.startswith("run:") else cache)
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.tokenizer.kind == "task":
        tokenizer = load_tokenizer(task_files(workdir, cfg.seed)["tokenizer"])
    else:
        if not cfg.tokenizer.path:
            raise ConfigError("tokenizer.path must name a local tokenizer directory when tokenizer.kind='hf'")
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    return StageEnv(cfg=cfg, workdir=workdir, stage=stage, mesh=mesh, tokenizer=tokenizer, run_cfg=run_cfg)


def restore_or_start(env: StageEnv, ckpt_cfg: CheckpointConfig, state: Any,
                     ) -> tuple[checkpoint.StageCheckpoints, Any, int]:
    """Opens the stage's checkpoints (creating the directory) and resumes from the latest.

    Call only after inputs are validated: a run that fails validation writes nothing here.
    Returns (checkpoints, state, first step to run).
    """
    ckpts = checkpoint.StageCheckpoints(env.stage_dir / "checkpoints", ckpt_cfg)

    def same_model(step: int, meta: dict[str, Any]) -> None:
        saved_model = meta.get("config", {}).get("model")
        if saved_model:  # a training state is not converted between layouts: scan_layers counts
            where = f"{ckpts.directory}/{step}"
            checkpoint.check_same_model(model_config_from_dict(saved_model, f"{where} (meta)"), env.cfg.model,
                                        where, include_layout=True)

    # a damaged newest step falls back to an older one
    saved = ckpts.restore_newest_intact(state, check_meta=same_model)
    if saved is None:
        return ckpts, state, 0
    state, meta = saved
    return ckpts, state, int(meta["step"])


def write_run_config(env: StageEnv) -> None:
    if jax.process_index() == 0:
        save_config(env.run_cfg or env.cfg, env.workdir / "config.json")
        save_config(env.cfg, env.stage_dir / "config.json")


def count_tokens(batch: Any) -> int:
    """Real (non-padding) tokens in a process-local numpy batch."""
    return int((batch.segment_ids > 0).sum()) * jax.process_count()


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in a loss or gradient norm; the message names the step and metric."""


def check_finite(step: int, values: dict[str, float], ckpts: checkpoint.StageCheckpoints) -> None:
    """Stops the run on the first non-finite metric, before it can be checkpointed."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        ckpts.wait()  # the last good checkpoint may still be in flight: finish it before stopping
        key, last = sorted(bad)[0], ckpts.latest_step()
        kept = (f"the last good checkpoint is step {last} in {ckpts.directory}" if last is not None else
                f"there is no checkpoint yet in {ckpts.directory}, so a rerun starts from step 0")
        raise NonFiniteError(
            f"step {step}: {key} is {bad[key]} (non-finite: {sorted(bad)}); nothing from this step was "
            f"saved, {kept}")


class Interrupted(Exception):
    """The pipeline stopped after a SIGTERM; the message says where, and a rerun resumes."""

    def __init__(self, where: str):
        super().__init__(f"interrupted {where}; rerun the same command to resume")


class Preemption:
    """Turns SIGTERM into a request to stop: loops poll ``requested(step)`` between steps,
    save a checkpoint and return, so a rerun resumes. With several processes, JAX's
    preemption sync point makes every process stop at the same step: JAX's own SIGTERM
    notifier (installed by ``jax.distributed.initialize``) tells the coordinator, so no Python
    handler is installed then (it would replace that notifier, and a process that stopped
    alone would leave the others waiting in a collective)."""

    def __init__(self):
        self._flag = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self._flag = True
        if callable(self._previous):  # an enclosing Preemption (the pipeline's) hears it too
            self._previous(signum, frame)

    @property
    def signalled(self) -> bool:
        """SIGTERM arrived while this was entered (single process; no device sync)."""
        return self._flag

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag


def train_loop(env: StageEnv, *, state: Any, step_fn: Callable, batches: Any, total_steps: int,
               ckpts: checkpoint.StageCheckpoints, start_step: int, log_every: int, eval_every: int,
               evaluate: Callable[[Any], dict[str, float]] | None, save_every: int,
               logger: MetricsLogger, progress_key: str, stop_after: int | None = None) -> tuple[Any, bool]:
    """Runs ``step_fn`` from ``start_step`` to ``total_steps``; logs, evaluates and saves.

    Device values are fetched only at log, eval and save points (where a NaN or Inf stops
    the run before anything bad is saved); the data position saved with each checkpoint is
    the step count, since batches are a pure function of the step. ``stop_after``: run at
    most this many steps in this call (time-sliced jobs); SIGTERM stops early the same way.
    Both checkpoint and return. Returns (state, finished).
    """
    stop = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    tokens, last_time = 0, time.perf_counter()
    done = start_step
    with Preemption() as preemption:
        for step in range(start_step, stop):
            local = batches.get(step)
            tokens += count_tokens(local)
            state, metrics = step_fn(state, to_global(local, env.mesh))
            done = step + 1
            preempted = preemption.requested(done)
            save = done % save_every == 0 or done == stop or preempted
            if done % log_every == 0 or save:
                jax.block_until_ready(metrics)  # waits on the device only here
                now = time.perf_counter()
                values = logger.log(done, {**metrics, "perf/tokens_per_second": tokens / (now - last_time)})
                check_finite(done, values, ckpts)
                logger.progress(done, **{progress_key: values[progress_key],
                                         "tok/s": values["perf/tokens_per_second"]})
                tokens, last_time = 0, now
            if evaluate is not None and (done % eval_every == 0 or done == total_steps):
                logger.log(done, evaluate(state))
                last_time = time.perf_counter()  # evaluation time is not training throughput
            if save:
                ckpts.save(done, state, {"step": done, "config": to_dict(env.cfg)})
            if preempted:
                break
    ckpts.wait()
    return state, done == total_steps
