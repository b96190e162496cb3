"""JSONL validation: every bad record names file, 1-based line and what is wrong."""

import json

import pytest

from rlhf_jax.data.jsonl import DataError, iter_records, read_records

GOOD_DEMO = {"prompt": "w1", "response": "w2"}


@pytest.mark.parametrize("kind, bad_line, message", [
    ("demonstrations", '{"prompt": "a", "response": "b"', "not valid JSON"),
    ("demonstrations", '{"prompt": "a"}', 'missing field "response"'),
    ("demonstrations", '{"prompt": 3, "response": "b"}',
     'field "prompt" must be a string, got int'),
    ("demonstrations", '{"prompt": "a", "response": ""}', 'field "response" is empty'),
    ("demonstrations", '{"prompt": "a", "response": "  \\n "}', 'field "response" is empty'),
    ("demonstrations", '["a", "b"]', "expected a JSON object, got list"),
    ("text", '{"text": ""}', 'field "text" is empty'),
    ("text", '{"txt": "a"}', 'missing field "text"'),
    ("prompts", '{"prompt": ""}', 'field "prompt" is empty'),
    ("prompts", '{"prompt": null}', 'field "prompt" must be a string, got NoneType'),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"], "ranks": [0]}',
     'field "ranks" has 1 entries but "responses" has 2'),
    ("comparisons", '{"prompt": "p", "responses": ["a"], "ranks": [0]}',
     'field "responses" has 1 entries; a comparison needs 2 to 9'),
    ("comparisons", json.dumps({"prompt": "p", "responses": ["a"] * 10, "ranks": [0] * 10}),
     'field "responses" has 10 entries; a comparison needs 2 to 9'),
    ("comparisons", '{"prompt": "p", "responses": ["a", 7], "ranks": [0, 1]}',
     'field "responses"[1] must be a string, got int'),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]}',
     'field "ranks"[1] must be an integer, got float'),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"], "ranks": [true, false]}',
     'field "ranks"[0] must be an integer, got bool'),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}',
     'field "ranks"[1] is -1'),
    ("comparisons", '{"prompt": "p", "responses": "ab", "ranks": [0, 1]}',
     'field "responses" must be a list, got str'),
    ("comparisons", '{"prompt": "p", "responses": ["a", "b"]}', 'missing field "ranks"'),
    ("comparisons", '{"prompt": "p", "chosen": "a"}', 'missing field "rejected"'),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": 0}',
     'field "rejected" must be a string, got int'),
])
def test_bad_record_names_file_and_line(write_jsonl, kind, bad_line, message):
    good = {"demonstrations": GOOD_DEMO, "text": {"text": "w1"}, "prompts": {"prompt": "w1"},
            "comparisons": {"prompt": "p", "chosen": "a", "rejected": "b"}}[kind]
    # Lines: 1 good, 2 empty (skipped but counted), 3 bad.
    path = write_jsonl("data.jsonl", [good, "", bad_line, good])
    with pytest.raises(DataError) as err:
        list(iter_records(path, kind))
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_truncated_last_line_is_reported(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps(GOOD_DEMO) + "\n" + '{"prompt": "a", "respo')  # cut mid-write
    with pytest.raises(DataError, match=r"demos\.jsonl:2: not valid JSON \(truncated line\?\)"):
        read_records(path, "demonstrations")


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "\xff"}\n')
    with pytest.raises(DataError, match=r"demos\.jsonl:1: not valid UTF-8"):
        read_records(path, "demonstrations")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl", "demonstrations")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        read_records(tmp_path / "empty.jsonl", "demonstrations")
    with pytest.raises(DataError, match="unknown data kind"):
        read_records(tmp_path / "empty.jsonl", "demos")


def test_good_records_with_line_numbers(write_jsonl):
    path = write_jsonl("c.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1], "labeler": "x"},
        "",
        {"prompt": "", "chosen": "good", "rejected": "bad"},
    ])
    assert read_records(path, "comparisons") == [
        (1, {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}),  # extra key dropped
        (3, {"prompt": "", "responses": ["good", "bad"], "ranks": [0, 1]}),  # pairwise -> K=2
    ]


def test_compared_responses_may_be_empty(write_jsonl):
    # A policy sample that emits EOS at once is an empty response the RM must score.
    path = write_jsonl("c.jsonl", [{"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]},
                                   {"prompt": "p", "chosen": "a", "rejected": ""}])
    assert [r["responses"] for _, r in read_records(path, "comparisons")] == [["a", ""], ["a", ""]]


def test_demonstration_prompt_may_be_empty_but_ppo_prompt_may_not(write_jsonl):
    path = write_jsonl("d.jsonl", [{"prompt": "", "response": "r"}])
    assert read_records(path, "demonstrations") == [(1, {"prompt": "", "response": "r"})]
    with pytest.raises(DataError, match='d.jsonl:1: field "prompt" is empty'):
        read_records(path, "prompts")
