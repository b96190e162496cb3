"""Run outputs of a stage: ``metrics.jsonl``, TensorBoard events and a progress bar.

Only process 0 writes. Values arrive as device scalars and are fetched here, at the log
interval, so the train loop itself never waits on the device.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


class MetricsLogger:
    """Appends ``{"step": n, **metrics}`` lines to ``<stage_dir>/metrics.jsonl``.

    On resume from step n, lines past n (from the part of the run that was lost) are
    dropped so the file describes exactly one run.
    """

    def __init__(self, stage_dir: str | pathlib.Path, resume_step: int = 0, total_steps: int | None = None,
                 description: str = "", show_progress: bool = True):
        self.stage_dir = pathlib.Path(stage_dir)
        self.is_writer = jax.process_index() == 0
        self.path = self.stage_dir / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not self.is_writer:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
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
    path = pathlib.Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
