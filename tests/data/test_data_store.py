"""JSONL -> TFDS array_record store: round trip, cache reuse, errors leave nothing behind."""

import pathlib

import pytest

from rlhf_jax.data.jsonl import DataError, read_records
from rlhf_jax.data.tfds_store import build_store, content_hash, open_store

COMPARISONS = [
    {"prompt": "p é ünïcode", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
    {"prompt": "", "chosen": "x", "rejected": "y"},
    {"prompt": "q", "responses": [f"r{i}" for i in range(9)], "ranks": list(range(9))},
    {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "ü"}],
     "responses": ["a", "b"], "ranks": [0, 0]},
]
CONVERSATION = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"}]


@pytest.mark.parametrize("kind, records", [
    ("comparisons", COMPARISONS),
    ("demonstrations", [{"prompt": "p", "response": "r"}, {"prompt": "", "response": "s t"},
                        {"prompt": CONVERSATION, "response": "c"}]),
    ("text", [{"text": "one"}, {"text": "two three"}]),
    # a text prompt that reads as JSON stays text
    ("prompts", [{"prompt": "a b"}, {"prompt": CONVERSATION}, {"prompt": '[{"role": "user"}]'}]),
])
def test_round_trip_equals_jsonl(write_jsonl, cache_dir, kind, records):
    path = write_jsonl(f"{kind}.jsonl", records[:1] + [""] + records[1:])  # an empty line 2
    source = open_store(path, kind, cache_dir)
    expected = [{**record, "line": line} for line, record in read_records(path, kind)]
    assert len(source) == len(expected)
    assert list(source) == expected
    assert [source[i] for i in reversed(range(len(source)))] == expected[::-1]  # random access
    assert source.path == str(path)


def test_built_once_per_content(write_jsonl, cache_dir):
    path = write_jsonl("d.jsonl", [{"prompt": "p", "response": "r"}])
    first = build_store(path, "demonstrations", cache_dir)
    assert first == pathlib.Path(cache_dir) / "demonstrations" / content_hash(path) / "1.1.0"
    stamp = (first / "dataset_info.json").stat().st_mtime_ns
    assert build_store(path, "demonstrations", cache_dir) == first
    assert (first / "dataset_info.json").stat().st_mtime_ns == stamp  # not rebuilt
    # New content -> a new dataset beside the old one.
    path.write_text('{"prompt": "p", "response": "changed"}\n')
    second = build_store(path, "demonstrations", cache_dir)
    assert second != first and second.parent.parent == first.parent.parent
    assert list(open_store(path, "demonstrations", cache_dir))[0]["response"] == "changed"


def test_bad_file_raises_and_leaves_no_dataset(write_jsonl, cache_dir):
    path = write_jsonl("demos.jsonl", [{"prompt": "p", "response": "r"}] * 16
                       + [{"prompt": "p", "response": ""}])
    with pytest.raises(DataError, match=r'demos\.jsonl:17: field "response" is empty'):
        build_store(path, "demonstrations", cache_dir)
    assert not list(pathlib.Path(cache_dir).glob("demonstrations/*/*"))
    with pytest.raises(DataError, match="no such file"):
        build_store(path.with_name("absent.jsonl"), "demonstrations", cache_dir)
