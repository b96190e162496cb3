"""OpenAI's summarization data: ``summarize-from-feedback`` comparisons and ``tldr``
demonstrations.

Prompts are written as OpenAI's code formats queries (and TRL's ``tldr`` sets copy):
``SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:`` for Reddit
posts, ``Article:\\n{article}\\n\\nTL;DR:`` for CNN/DM rows (``info.article``). A summary
starts with the space that separates it from ``TL;DR:``: the comparisons' summaries carry
it already, a ``tldr`` summary gets one, and a space ending a given prompt (``TL;DR: `` in
the ``{prompt, label}`` parquet) moves to the summary, since prompt and response are
tokenised apart.

- ``summarize-from-feedback``: ``comparisons/batchN.json`` (JSON lines despite the name):
  ``info``, ``summaries[2].text``, ``choice`` (index of the preferred summary), ``split``
  (``train``, ``valid1``, ``valid2``: the record's own split wins over the file name's).
  Dropped: an empty summary, two equal summaries.
- ``tldr``: ``{subreddit, title, post, summary}`` (``tldr_3_filtered``), or
  ``{prompt, label}`` / ``{prompt, completion}`` with a text prompt. Dropped: an empty summary.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data.public.output import Sink
from rlhf_jax.data.public.records import BadRecord, Unusable, field

TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
ARTICLE_FORMAT = "Article:\n{article}\n\nTL;DR:"


def query(info: dict[str, Any], prefix: str = "") -> str:
    """The prompt of a Reddit post or a CNN/DM article (``info.article``); ``prefix`` is
    where ``info`` sits in the record, for errors."""
    if "article" in info:
        return ARTICLE_FORMAT.format(article=field(info, "article", str, f'field "{prefix}article"'))
    slots = ("subreddit", "title", "post")
    return TLDR_FORMAT.format(**{k: field(info, k, str, f'field "{prefix}{k}"') for k in slots})


def spaced(prompt: str, summary: str) -> tuple[str, str]:
    """``prompt`` without trailing spaces, ``summary`` starting with exactly that separator
    (one space when there was none)."""
    kept = prompt.rstrip(" ")
    summary = prompt[len(kept):] + summary
    return kept, summary if summary[:1].isspace() else " " + summary


def convert_comparison(obj: dict[str, Any], out: Sink) -> None:
    prompt = query(field(obj, "info", dict), "info.")
    summaries = field(obj, "summaries", list)
    if len(summaries) != 2:
        raise BadRecord(f'field "summaries" has {len(summaries)} entries; a comparison has 2')
    texts = [field(s if isinstance(s, dict) else {}, "text", str, f'field "summaries[{i}].text"')
             for i, s in enumerate(summaries)]
    choice = field(obj, "choice", int)
    if choice not in (0, 1):
        raise BadRecord(f'field "choice" is {choice}; it indexes one of the 2 summaries')
    split = obj.get("split")
    if not all(t.strip() for t in texts):
        raise Unusable("empty summary")
    if texts[0].strip() == texts[1].strip():
        raise Unusable("chosen == rejected")
    pairs = [spaced(prompt, t) for t in texts]
    out.comparison(pairs[0][0], [s for _, s in pairs], [0, 1] if choice == 0 else [1, 0],
                   split=split if isinstance(split, str) and split else None)


def convert_demonstration(obj: dict[str, Any], out: Sink) -> None:
    if "summary" in obj:
        prompt, summary = query(obj), field(obj, "summary", str)
    elif "prompt" in obj:
        prompt = field(obj, "prompt", str, 'field "prompt" (a message list is the trl format\'s)')
        summary = field(obj, "label" if "label" in obj else "completion", str)
    else:
        raise BadRecord('no "summary" (tldr_3_filtered) nor "prompt" with "label"/"completion"')
    if not summary.strip():
        raise Unusable("empty summary")
    out.demonstration(*spaced(prompt, summary))
