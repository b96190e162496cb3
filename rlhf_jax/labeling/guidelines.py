"""The labeling instructions: a Markdown file (``--guidelines``, or the packaged
``static/guidelines.md``) rendered once to HTML for the page, with a version (a hash of
its text) recorded in every label, so a lead can tell which labels predate a change."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import pathlib

from markdown_it import MarkdownIt

MAX_GUIDELINES_BYTES = 512 * 1024


@dataclasses.dataclass(frozen=True)
class Guidelines:
    source: str  # the file's path, or "packaged default"
    version: str  # the first 12 hex digits of the text's SHA-256
    html: str


def render(text: str) -> str:
    """Markdown to HTML with raw HTML shown as text (no script or markup from the file runs)
    and unsafe link schemes (``javascript:``) left unlinked."""
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def load_guidelines(path: str | pathlib.Path | None) -> Guidelines:
    """``path`` (Markdown, UTF-8) or the packaged default; a bad file is a ValueError naming it."""
    if path is None:
        text = importlib.resources.files("rlhf_jax.labeling").joinpath("static", "guidelines.md").read_text()
        source = "packaged default"
    else:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"--guidelines {path}: no such file")
        data = path.read_bytes()
        if len(data) > MAX_GUIDELINES_BYTES:
            raise ValueError(f"--guidelines {path}: {len(data)} bytes; at most {MAX_GUIDELINES_BYTES}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--guidelines {path}: not UTF-8 text (byte {err.start})") from None
        source = str(path)
    return Guidelines(source, hashlib.sha256(text.encode()).hexdigest()[:12], render(text))
