"""Fixtures for the data tests: a tiny word-level HF tokenizer built locally, JSONL writer."""

import json
import pathlib

import pytest
from data_testlib import save_tokenizer

from rlhf_jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> pathlib.Path:
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"), with_pad=True)


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture
def write_jsonl(tmp_path):
    """``write_jsonl(name, records)`` -> path; a str record is written verbatim as a line."""

    def write(name: str, records) -> pathlib.Path:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("".join(line + "\n" for line in lines))
        return path

    return write


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")
