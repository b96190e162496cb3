"""The one train loop every stage runs (pretrain, SFT, RM and PPO), and its stop signals.

The accelerator is kept busy: the next batches are read and put on the device by a
background thread while the current step runs, and a step's metrics are read after the
next step has been dispatched (one step late), so the host never waits on the device between
steps except where it must: before a checkpoint (a NaN or Inf must stop the run before it is
saved) and for an evaluation. Checkpoints are written asynchronously by Orbax.
"""

from __future__ import annotations

import contextlib
import math
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
from jax.experimental import multihost_utils

from rlhf_jax import checkpoint
from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.data import to_global
from rlhf_jax.logging import MetricsLogger


def count_tokens(batch: Any) -> int:
    """Real (non-padding) tokens in a process-local numpy batch, over all processes."""
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
        self._raise_where: str | None = None

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
        if self._raise_where is not None:
            raise Interrupted(self._raise_where)

    @contextlib.contextmanager
    def raising(self, where: str) -> Iterator[None]:
        """Inside the block a SIGTERM stops at once with :class:`Interrupted` (``where``), for
        work that writes nothing a stop could leave half done (an evaluation): waiting for
        its end could outlast a preemption's grace period."""
        if self._flag:
            raise Interrupted(where)
        self._raise_where = where
        try:
            yield
        finally:
            self._raise_where = None

    @property
    def signalled(self) -> bool:
        """SIGTERM arrived while this was entered (single process; no device sync)."""
        return self._flag

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag


SWITCH_INTERVAL_S = 0.0002  # the GIL's hand-over interval while a Prefetcher runs (see there)


class Prefetcher:
    """Iterates ``(step, local, placed)`` for ``step`` in ``[start, stop)``: ``local =
    get(step)`` (host arrays) and ``placed = put(local)`` (on the device), prepared by a
    background thread up to ``depth`` steps ahead. An error there is raised here, at the step
    it happened; leaving the ``with`` block stops the thread.

    While it runs, the interpreter hands the GIL between threads every
    :data:`SWITCH_INTERVAL_S` instead of every 5 ms: the thread's batch assembly is Python
    (grain's shuffle, packing), and with the default interval the main thread waited up to
    5 ms for the lock before dispatching each step. Measured on 2 CPU cores, the SFT stage
    loop of a 1-layer model (benchmarks/loop_overhead.py): 640-730 steps/s at 5 ms, 1000-1170
    at 0.2 ms, against 1020-1090 for the bare step on one batch (880-900 with no thread,
    assembling each batch between steps)."""

    def __init__(self, get: Callable[[int], Any], put: Callable[[Any], Any], start: int, stop: int,
                 depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(get, put, start, stop), daemon=True,
                                        name="rlhf_jax-prefetch")
        self._start, self._stop = start, stop

    def _fill(self, get, put, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                local = get(step)
                item = (step, local, put(local), None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                item = (step, None, None, err)
            while not self._stopping.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[3] is not None or self._stopping.is_set():
                return

    def __enter__(self) -> "Prefetcher":
        self._previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._previous_interval, SWITCH_INTERVAL_S))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._thread.join()
        sys.setswitchinterval(self._previous_interval)

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        for _ in range(self._start, self._stop):
            step, local, placed, err = self._queue.get()
            if err is not None:
                raise err
            yield step, local, placed


StepFn = Callable[[Any, Any, int], tuple[Any, dict[str, Any]]]


def train_loop(env: Any, *, state: Any, step_fn: StepFn, batches: Any, total_steps: int,
               ckpts: checkpoint.StageCheckpoints, start_step: int, log_every: int, eval_every: int,
               evaluate: Callable[[Any], dict[str, float]] | None, save_every: int,
               logger: MetricsLogger, progress: dict[str, str], stop_after: int | None = None,
               count: Callable[[Any], int] = count_tokens, prefetch: int = 2) -> tuple[Any, bool]:
    """Runs ``step_fn(state, batch, step) -> (state, metrics)`` from ``start_step`` to
    ``total_steps`` over ``batches.get(step)`` (placed on ``env.mesh``); logs, evaluates and
    saves.

    Metrics are device values, fetched only at log, eval and save points; a log point's are
    read once the next step is dispatched, a save or eval point's at once (a NaN or Inf stops
    the run before anything bad is saved). The data position saved with each checkpoint is
    the step count, since batches are a pure function of the step. ``stop_after``: run at
    most this many steps in this call (time-sliced jobs); SIGTERM stops early the same way.
    Both checkpoint and return. ``progress``: the progress bar's ``{label: metric}``;
    ``count(local)``: the tokens of a batch, for throughput. Returns (state, finished).
    """
    if start_step > total_steps:  # it would stop "early" at once, every time it is rerun
        raise ConfigError(f"{ckpts.directory}: its newest checkpoint is step {start_step}, past the {total_steps} "
                          "steps this run trains (max_steps, iterations or epochs were lowered); rerun with the "
                          "settings it was trained with, or use a new --workdir")
    stop = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    window = {"tokens": 0, "steps": 0, "since": time.perf_counter()}

    def read(done: int, metrics: dict[str, Any], tokens: int, steps: int) -> None:
        metrics = jax.device_get(metrics)  # waits on the device for that step only
        now = time.perf_counter()
        elapsed = now - window["since"]
        values = logger.log(done, {**metrics, "perf/tokens_per_second": tokens / elapsed,
                                   "perf/steps_per_second": steps / elapsed})
        check_finite(done, values, ckpts)
        logger.progress(done, **{label: values[key] for label, key in progress.items()},
                        **{"tok/s": values["perf/tokens_per_second"]})
        window["since"] = now

    done, unread = start_step, None
    with Preemption() as preemption, Prefetcher(batches.get, lambda local: to_global(local, env.mesh),
                                                start_step, stop, prefetch) as ahead:
        for step, local, batch in ahead:
            window["tokens"] += count(local)
            window["steps"] += 1
            state, metrics = step_fn(state, batch, step)
            done = step + 1
            if unread is not None:  # the previous log point's, while this step runs
                read(*unread)
                unread = None
            preempted = preemption.requested(done)
            save = done % save_every == 0 or done == stop or preempted
            evaluating = evaluate is not None and (done % eval_every == 0 or done == total_steps)
            if done % log_every == 0 or save:
                unread = (done, metrics, window["tokens"], window["steps"])
                window["tokens"] = window["steps"] = 0
                if save or evaluating:  # the device is waited on here anyway
                    read(*unread)
                    unread = None
            if evaluating:
                logger.log(done, evaluate(state))
                window["since"] = time.perf_counter()  # evaluation time is not training throughput
            if save:
                ckpts.save(done, state, {"step": done, "config": to_dict(env.cfg), "inputs": env.inputs})
            if preempted:
                break
    if unread is not None:
        read(*unread)
    ckpts.wait()
    return state, done == total_steps
