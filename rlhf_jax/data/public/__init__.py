"""Public preference and demonstration sets in our JSONL: ``rlhf-jax data convert``.

:data:`FORMATS` is the table of formats, one module per family (``hh``, ``summarize``,
``trl``, ``ultrafeedback``, ``oasst``, ``shp``); :func:`convert` reads the inputs (see
:mod:`.reading`), runs the format's converter and writes ``OUT/<split>/*.jsonl`` (see
:mod:`.output`) plus ``OUT/convert.json``. A record in the wrong layout stops the
conversion with its file and line; a record in the layout that cannot be used is dropped
and counted by reason. Same inputs and options, same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterable, Iterator, Sequence

from rlhf_jax.atomic import write_text
from rlhf_jax.data.jsonl import DataError
from rlhf_jax.data.public import hh, oasst, shp, summarize, trl, ultrafeedback
from rlhf_jax.data.public.output import Options, Sink, refuse_to_overwrite
from rlhf_jax.data.public.reading import Row, input_files, read_rows, split_of
from rlhf_jax.data.public.records import BadRecord, Unusable

FileConverter = Callable[[Iterable[Row], Sink], None]


def per_record(convert: Callable[[dict[str, Any], Sink], None]) -> FileConverter:
    """A file converter calling ``convert(record, sink)`` on each record; an
    :class:`Unusable` record is counted as dropped."""
    def convert_file(rows: Iterable[Row], out: Sink) -> None:
        for _, obj in rows:
            try:
                convert(obj, out)
            except Unusable as why:
                out.drop(why.reason)
    return convert_file


@dataclasses.dataclass(frozen=True)
class Format:
    convert: FileConverter
    layout: str  # what its records look like, for --help and errors


FORMATS: dict[str, Format] = {
    "hh-rlhf": Format(per_record(hh.convert_record), "Anthropic HH-RLHF {chosen, rejected} transcripts"),
    "summarize-from-feedback": Format(per_record(summarize.convert_comparison),
                                      "OpenAI comparisons {info, summaries, choice, split}"),
    "tldr": Format(per_record(summarize.convert_demonstration),
                   "TL;DR demonstrations {subreddit, title, post, summary} or {prompt, label|completion}"),
    "trl": Format(per_record(trl.convert_record),
                  "TRL layouts: preference, prompt-completion, prompt-only, messages, text"),
    "ultrafeedback-binarized": Format(per_record(trl.convert_ultrafeedback_binarized),
                                      "{chosen, rejected} conversations with score_chosen/score_rejected"),
    "ultrafeedback": Format(per_record(ultrafeedback.convert_record),
                            "raw UltraFeedback {instruction, completions[4] with ratings}: K-wise"),
    "oasst1": Format(oasst.convert_file, "OpenAssistant message trees or flat messages: K-wise + rank-0 replies"),
    "shp": Format(per_record(shp.convert_record), "Stanford SHP {history, human_ref_A/B, labels}"),
}


def _tracked(rows: Iterator[Row], sink: Sink, count: list[int]) -> Iterator[Row]:
    for where, obj in rows:
        sink.where = where
        count[0] += 1
        yield where, obj


def convert(format_name: str, inputs: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path,
            options: Options = Options(), overwrite: bool = False) -> dict[str, Any]:
    """Converts ``inputs`` (files or directories) of ``format_name`` into ``out_dir``.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` (which replaces only the files this
    conversion writes). A file's split is its record's (summarize-from-feedback), else its
    name's (``train``, ``test``, ``validation``, ...), else ``train``; ``options.split``
    overrides both. Returns the summary also written to ``out_dir/convert.json``:
    ``{"format", "inputs", "options", "read", "written": {split: {kind: n}}, "dropped":
    {reason: n}}``. Raises :class:`DataError` naming file and line for a record not in the
    format's layout; nothing is then written (nor left: ``out_dir`` is as it was).
    """
    if format_name not in FORMATS:
        raise DataError(f"--format {format_name!r}: expected one of {', '.join(FORMATS)}")
    files = input_files(inputs)
    out_dir = pathlib.Path(out_dir)
    refuse_to_overwrite(out_dir, overwrite)
    made_out_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    sink, count = Sink(out_dir, options), [0]
    try:
        for path in files:
            sink.split = split_of(path) or "train"
            FORMATS[format_name].convert(_tracked(read_rows(path), sink, count), sink)
        if not sink.kept:
            reasons = ", ".join(f"{r} ({n})" for r, n in sink.dropped.most_common()) or "no records"
            raise DataError(f"{', '.join(map(str, files))}: nothing to write from {count[0]} records "
                            f"as {format_name}: {reasons}")
        summary = {"format": format_name, "inputs": [str(p) for p in files], "options": dataclasses.asdict(options),
                   "read": count[0], "written": {split: dict(sorted(kinds.items())) for split, kinds
                                                 in sorted(sink.kept.items())},
                   "dropped": dict(sorted(sink.dropped.items()))}
        sink.commit()
    except BaseException as err:
        sink.abort()
        if made_out_dir:
            out_dir.rmdir()
        if isinstance(err, BadRecord):
            raise DataError(f"{sink.where}: {err} (is this {format_name} data? expected "
                            f"{FORMATS[format_name].layout})") from None
        raise
    write_text(out_dir / "convert.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def describe(summary: dict[str, Any], out_dir: str | pathlib.Path) -> str:
    """The summary as the lines ``rlhf-jax data convert`` prints."""
    lines = [f"{summary['format']}: {summary['read']} records read from {len(summary['inputs'])} file(s)"]
    for split, kinds in summary["written"].items():
        kept = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        lines.append(f"  {split}: {kept} -> {pathlib.Path(out_dir) / split}/")
    dropped = summary["dropped"]
    if dropped:
        lines.append(f"  dropped: " + ", ".join(f"{reason} ({n})" for reason, n in
                                                 sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))))
    else:
        lines.append("  dropped: nothing")
    return "\n".join(lines)
