"""Where converted records go: per split, one JSONL file per kind, checked, de-duplicated,
tallied, written under temporary names and moved into place only when the whole
conversion succeeded.

Layout: ``OUT/<split>/{demonstrations,comparisons,prompts,text}.jsonl`` (only kinds that
got records) and ``OUT/convert.json`` (what was read, kept and dropped). ``prompts.jsonl``
holds every distinct prompt of the split's comparisons, demonstrations and prompt records,
in first-seen order, for PPO.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Literal, Sequence

from rlhf_jax.data.chat import Prompt, is_conversation, parse_transcript, render_transcript, user_message
from rlhf_jax.data.jsonl import MAX_RESPONSES, DataError, validate_record

KINDS: tuple[str, ...] = ("demonstrations", "comparisons", "prompts", "text")
PromptStyle = Literal["auto", "chat", "text"]


@dataclasses.dataclass(frozen=True)
class Options:
    """How a conversion writes what it reads.

    ``split``: put every record in this split (default: the file's or record's own, else
    ``train``). ``prompt_style``: ``auto`` keeps each set's own (text for HH and TL;DR,
    conversations for the chat sets); ``chat`` makes text prompts conversations (an HH
    transcript becomes its turns, other text one user message; the reply loses its leading
    space); ``text`` renders conversations as HH transcripts (``\\n\\nHuman: ...
    \\n\\nAssistant:``, the reply after a space). ``chosen_as_demonstrations``: also write
    each comparison's single best response as a demonstration. ``score``: UltraFeedback's
    ranking score, the mean of its aspect ratings or GPT-4's ``overall_score``.
    """

    split: str | None = None
    prompt_style: PromptStyle = "auto"
    chosen_as_demonstrations: bool = False
    score: Literal["aspects", "overall"] = "aspects"


def move_boundary_space(prompt: str, responses: Sequence[str]) -> tuple[str, list[str]]:
    """Spaces ending a text prompt moved to the start of each response.

    Prompt and response are tokenised apart and joined as ids, so a trailing space left on
    the prompt would be a lone space token there and the response's first word would lose
    the space it carries in running text (``"TL;DR: " + "it"`` is not ``"TL;DR:" + " it"``
    token for token; the second is how the joined text tokenises).
    """
    kept = prompt.rstrip(" \t")
    moved = prompt[len(kept):]
    return kept, [moved + r for r in responses] if moved else list(responses)


def styled(prompt: Prompt, responses: Sequence[str], style: PromptStyle) -> tuple[Prompt, list[str]]:
    """``prompt`` and its responses in ``style`` (see :class:`Options`)."""
    if style == "chat" and not is_conversation(prompt):
        return parse_transcript(prompt) or user_message(prompt), [r.lstrip() for r in responses]
    if style == "text" and is_conversation(prompt):
        return render_transcript(prompt), [r if r[:1].isspace() else " " + r for r in responses]
    if not is_conversation(prompt):
        return move_boundary_space(prompt, responses)
    return prompt, list(responses)


def _key(*parts: Any) -> bytes:
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).digest()


class Sink:
    """Collects one conversion's records; converters call :meth:`comparison`,
    :meth:`demonstration`, :meth:`prompt`, :meth:`text` and :meth:`drop`.

    ``split`` is the split records go to unless a call names one (``options.split``
    overrides both). Each record is styled, validated as our schema, de-duplicated (an exact
    repeat is dropped as ``duplicate``) and appended to a temporary file in ``out_dir``.
    """

    def __init__(self, out_dir: pathlib.Path, options: Options):
        self.out_dir = out_dir
        self.options = options
        self.split = "train"
        self.where = str(out_dir)  # the record being converted, for errors (the reader sets it)
        self.kept: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.dropped: collections.Counter = collections.Counter()
        self._seen: set[bytes] = set()
        self._files: dict[tuple[str, str], tuple[pathlib.Path, Any]] = {}
        self._created: list[pathlib.Path] = []  # split folders this conversion made

    def _split(self, split: str | None) -> str:
        return self.options.split or split or self.split

    def _write(self, split: str, kind: str, record: dict[str, Any]) -> bool:
        key = _key(split, kind, record)
        if key in self._seen:
            return False
        self._seen.add(key)
        try:
            validate_record(record, kind)  # a set's quirk or a converter's bug, caught before writing
        except DataError as err:
            raise DataError(f"{self.where}: converts to an unusable {err}") from None
        if (split, kind) not in self._files:
            folder = self.out_dir / split
            if not folder.is_dir():
                folder.mkdir(parents=True)
                self._created.append(folder)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{kind}.jsonl.")
            self._files[split, kind] = (pathlib.Path(tmp), os.fdopen(fd, "w", encoding="utf-8"))
        self._files[split, kind][1].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.kept[split][kind] += 1
        return True

    def comparison(self, prompt: Prompt, responses: Sequence[str], ranks: Sequence[int],
                   split: str | None = None) -> None:
        """K responses ranked 0 = best, equal = tie; more than 9 keep the 9 best."""
        if len(responses) > MAX_RESPONSES:
            best = sorted(range(len(responses)), key=lambda i: ranks[i])[:MAX_RESPONSES]
            self.drop("responses beyond the 9 best", len(responses) - MAX_RESPONSES)
            responses, ranks = [responses[i] for i in sorted(best)], [ranks[i] for i in sorted(best)]
        split = self._split(split)
        prompt, responses = styled(prompt, responses, self.options.prompt_style)
        record = {"prompt": prompt, "responses": responses, "ranks": [int(r) for r in ranks]}
        if not self._write(split, "comparisons", record):
            self.drop("duplicate")
            return
        self._add_prompt(split, prompt)
        best = [r for r, rank in zip(responses, ranks) if rank == min(ranks)]
        if self.options.chosen_as_demonstrations and len(best) == 1:
            self._write(split, "demonstrations", {"prompt": prompt, "response": best[0]})

    def demonstration(self, prompt: Prompt, response: str, split: str | None = None) -> None:
        split = self._split(split)
        prompt, (response,) = styled(prompt, [response], self.options.prompt_style)
        if not self._write(split, "demonstrations", {"prompt": prompt, "response": response}):
            self.drop("duplicate")
            return
        self._add_prompt(split, prompt)

    def _add_prompt(self, split: str, prompt: Prompt) -> None:
        if is_conversation(prompt) or prompt.strip():  # PPO samples from a prompt: an empty one is none
            self._write(split, "prompts", {"prompt": prompt})

    def prompt(self, prompt: Prompt, split: str | None = None) -> None:
        prompt, _ = styled(prompt, [], self.options.prompt_style)
        if not is_conversation(prompt) and not prompt.strip():
            self.drop("empty prompt")
            return
        self._write(self._split(split), "prompts", {"prompt": prompt})  # a repeat is merged, not dropped

    def text(self, text: str, split: str | None = None) -> None:
        if not self._write(self._split(split), "text", {"text": text}):
            self.drop("duplicate")

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def paths(self) -> dict[str, dict[str, pathlib.Path]]:
        """``{split: {kind: final path}}`` of every file this conversion writes."""
        out: dict[str, dict[str, pathlib.Path]] = collections.defaultdict(dict)
        for split, kind in sorted(self.kept_kinds):
            out[split][kind] = self.out_dir / split / f"{kind}.jsonl"
        return dict(out)

    @property
    def kept_kinds(self) -> list[tuple[str, str]]:
        return [(split, kind) for split, counts in self.kept.items() for kind in counts]

    def commit(self) -> None:
        """Moves every finished file into place (replacing a file of that name only)."""
        for (split, kind), (tmp, f) in sorted(self._files.items()):
            f.close()
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.out_dir / split / f"{kind}.jsonl")
        self._files.clear()

    def abort(self) -> None:
        """Removes the temporary files and the folders made for them: a failed conversion
        leaves the directory as it was."""
        for tmp, f in self._files.values():
            f.close()
            tmp.unlink(missing_ok=True)
        self._files.clear()
        for folder in self._created:
            folder.rmdir()
        self._created.clear()


def refuse_to_overwrite(out_dir: pathlib.Path, overwrite: bool) -> None:
    """A conversion writes into an empty or new ``--out``, or anywhere with ``--overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"--out {out_dir} is not empty; pass --overwrite to replace the files this conversion "
                        "writes there (others are left alone)")
