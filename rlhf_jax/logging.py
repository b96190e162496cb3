"""Run outputs of a stage: ``metrics.jsonl``, TensorBoard events and a progress bar.

Only process 0 writes. Values arrive as device scalars and are fetched here, at the log
interval, so the train loop itself never waits on the device.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from rlhf_jax.atomic import write_jsonl


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


# JSON has no NaN or Inf: they are stored as these strings and read back as floats
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(record: Mapping[str, Any]) -> str:
    def number(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return v
    return json.dumps({k: number(v) for k, v in record.items()}, allow_nan=False)


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def _key(record: Mapping[str, Any]) -> tuple:
    """Lines with the same step and keys describe the same event (one a rerun repeats)."""
    return record.get("step", 0), tuple(sorted(k for k in record if k != "step"))


def _read(path: pathlib.Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of ``path`` and whether a torn last line was dropped. A run killed while
    writing leaves at most its last line cut; a bad line before it is an error naming it."""
    text = path.read_text()
    lines = text.split("\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_decode(json.loads(line)))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the writer died mid-line
                print(f"rlhf-jax: warning: {path}:{number}: dropped a torn last line (a run was killed "
                      "while writing it)", file=sys.stderr)
                torn = True
                continue
            raise ValueError(f"{path}:{number}: not a metrics line ({err.msg}); the file was edited "
                             "or damaged: repair or remove that line") from err
    return records, torn


class MetricsLogger:
    """Appends ``{"step": n, **metrics}`` lines to ``<stage_dir>/metrics.jsonl``.

    Each line goes to the file in one ``write`` (a kill leaves no half line but the last,
    which the next run drops with a warning). On resume from step n, lines past n (from the
    part of the run that was lost) are dropped, and a line the rerun logs again (same step
    and keys: the step-0 evaluation, the truncation count, an RM line after training)
    replaces the old one, so the file describes exactly one run.
    """

    def __init__(self, stage_dir: str | pathlib.Path, resume_step: int = 0, total_steps: int | None = None,
                 description: str = "", show_progress: bool = True):
        self.stage_dir = pathlib.Path(stage_dir)
        self.is_writer = jax.process_index() == 0
        self.path = self.stage_dir / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self._earlier: dict[tuple, int] = {}  # key -> line index, for lines of the run being resumed
        if not self.is_writer:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            records, torn = _read(self.path)
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            if torn or len(kept) < len(records):
                write_jsonl(self.path, kept, _encode)
            self._earlier = {_key(r): i for i, r in enumerate(kept)}
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.stage_dir / "tensorboard"), purge_step=resume_step or None)
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, desc=description,
                             dynamic_ncols=True, mininterval=1.0)
        self._last = (time.perf_counter(), resume_step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Fetches and writes ``metrics``; returns them as floats (on every process)."""
        values = {k: _to_float(v) for k, v in metrics.items()}
        if not self.is_writer:
            return values
        record = {"step": step, **values}
        index = self._earlier.pop(_key(record), None)
        if index is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (_encode(record) + "\n").encode())
            finally:
                os.close(fd)
        else:  # logged by the run being resumed: replace that line (rare, so rewrite the file)
            records, _ = _read(self.path)
            records[index] = record
            write_jsonl(self.path, records, _encode)
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        return values

    def progress(self, step: int, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, float]]:
    """Every line of a ``metrics.jsonl`` (a torn last line dropped with a warning)."""
    return _read(pathlib.Path(path))[0]
