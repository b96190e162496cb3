"""Run outputs of a stage: ``metrics.jsonl``, TensorBoard events and a progress bar.

Only process 0 writes. Values arrive as device scalars and are fetched here, at the log
interval, so the train loop itself never waits on the device.

Both files are written in the caller's thread, each record in whole ``os.write`` calls: a
write that fails (a full disk) raises here, at the step that logged. tensorboardX's
``SummaryWriter`` wrote from a thread of its own instead; on a full disk that thread died
and the next ``add_scalar`` blocked forever on its queue, a process no SIGTERM ended.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import struct
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


def append_whole(path: pathlib.Path, data: bytes) -> None:
    """Appends ``data`` to ``path`` (created if needed); a short write is continued, and a
    write that cannot go on (no space left) raises ``OSError`` naming the file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        os.close(fd)


class EventsFile:
    """TensorBoard scalars in ``<directory>/events.out.tfevents.<time>.<host>``: TFRecord
    framing (length, masked CRC32C, payload, masked CRC32C) of ``Event`` protos, each event
    appended with :func:`append_whole`. ``purge_step``: TensorBoard hides the events an
    earlier run logged from that step on (a resumed run logs them again)."""

    def __init__(self, directory: pathlib.Path, purge_step: int | None = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        events = [Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_step is not None:
            events.append(Event(wall_time=time.time(), step=purge_step,
                                session_log=SessionLog(status=SessionLog.START)))
        self._write(events)

    def _write(self, events: list) -> None:
        from tensorboardX.record_writer import masked_crc32c

        records = []
        for event in events:
            payload = event.SerializeToString()
            header = struct.pack("Q", len(payload))
            records += [header, struct.pack("I", masked_crc32c(header)), payload,
                        struct.pack("I", masked_crc32c(payload))]
        append_whole(self.path, b"".join(records))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        self._write([Event(wall_time=now, step=step, summary=scalar(k, v)) for k, v in values.items()])


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
        self._tb = EventsFile(self.stage_dir / "tensorboard", purge_step=resume_step or None)
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
            append_whole(self.path, (_encode(record) + "\n").encode())
        else:  # logged by the run being resumed: replace that line (rare, so rewrite the file)
            records, _ = _read(self.path)
            records[index] = record
            write_jsonl(self.path, records, _encode)
        self._tb.scalars(step, values)
        return values

    def progress(self, step: int, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, float]]:
    """Every line of a ``metrics.jsonl`` (a torn last line dropped with a warning)."""
    return _read(pathlib.Path(path))[0]
