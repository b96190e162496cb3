"""Helpers for the public-format tests: write records in a set's own file layout, convert,
read the outputs back. Imported as ``public_testlib`` (test directories have no __init__)."""

import gzip
import json
import pathlib

from rlhf_jax.data.public import convert
from rlhf_jax.data.public.output import Options


def write_lines(path: pathlib.Path, records) -> pathlib.Path:
    """JSON lines (gzipped for ``.gz``); a str record is written verbatim as a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def write_parquet(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def read_out(out: pathlib.Path) -> dict[str, dict[str, list[dict]]]:
    """``{split: {kind: records}}`` of a conversion's output directory."""
    result = {}
    for path in sorted(out.glob("*/*.jsonl")):
        result.setdefault(path.parent.name, {})[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
    return result


def run(format_name: str, inputs, out: pathlib.Path, **options) -> tuple[dict, dict]:
    """Converts and returns ``(outputs as read_out gives them, summary)``."""
    summary = convert(format_name, inputs, out, Options(**options))
    return read_out(out), summary


# Records in the sets' own layouts, written by hand (shared by the format and convert tests).

HH_TWO_TURNS = {
    # both final replies open with "I think a": a split where the transcripts start to differ
    # would put those words in the prompt; one at the first turn, the second turn in the reply
    "chosen": "\n\nHuman: What is a dog?\n\nAssistant: An animal.\n\nHuman: Which kind?\n\nAssistant: I think a mammal.",
    "rejected": "\n\nHuman: What is a dog?\n\nAssistant: An animal.\n\nHuman: Which kind?\n\nAssistant: I think a fish.",
}
HH_PROMPT = "\n\nHuman: What is a dog?\n\nAssistant: An animal.\n\nHuman: Which kind?\n\nAssistant:"


POST = {"id": "t3_2vwp1w", "post": "I had a car accident on friday.\n\nhelp would be appeciated :)",
        "title": "Car accident questions.", "subreddit": "legaladvice"}
QUERY = ("SUBREDDIT: r/legaladvice\n\nTITLE: Car accident questions.\n\n"
         "POST: I had a car accident on friday.\n\nhelp would be appeciated :)\n\nTL;DR:")


def message(mid, role, text, rank=None, replies=(), **flags):
    return {"message_id": mid, "parent_id": None, "user_id": "u", "text": text, "role": role, "lang": "en",
            "review_count": 3, "review_result": True, "deleted": False, "rank": rank, "synthetic": False,
            "model_name": None, "emojis": {"+1": 2}, "labels": {"spam": {"value": 0.0, "count": 3}},
            "replies": list(replies), **flags}


TREE = {"message_tree_id": "p1", "tree_state": "ready_for_export", "prompt": message(
    "p1", "prompter", "Why is the sky blue?", replies=[
        message("a1", "assistant", "Rayleigh scattering.", rank=0, replies=[
            message("p2", "prompter", "Explain more.", replies=[
                message("a3", "assistant", "Short waves scatter more.", rank=1),
                message("a4", "assistant", "Blue light scatters most.", rank=0),
                message("a5", "assistant", "Spam spam.", rank=2, review_result=False)])]),
        message("a2", "assistant", "It reflects the ocean.", rank=2),
        message("a6", "assistant", "Deleted reply.", rank=1, deleted=True, replies=[
            message("p3", "prompter", "Under a deleted reply.")]),
        message("a7", "assistant", "Unreviewed.", rank=3, review_result=None)])}
WHY = {"role": "user", "content": "Why is the sky blue?"}
OASST_COMPARISONS = [
    {"prompt": [WHY], "responses": ["Rayleigh scattering.", "It reflects the ocean."], "ranks": [0, 2]},
    {"prompt": [WHY, {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": "Explain more."}],
     "responses": ["Short waves scatter more.", "Blue light scatters most."], "ranks": [1, 0]}]


def flatten(node, parent=None):
    """The tree as oasst's flat ``messages`` rows (parent_id links, no replies)."""
    row = {**{k: v for k, v in node.items() if k != "replies"}, "parent_id": parent, "message_tree_id": "p1"}
    return [row] + [r for reply in node["replies"] for r in flatten(reply, node["message_id"])]
