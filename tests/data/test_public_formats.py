"""Each public format, on records written by hand in the set's own layout, every quirk in.

Layouts as the sets ship them: HH-RLHF's ``{chosen, rejected}`` transcripts (train.jsonl.gz),
OpenAI's comparisons (``batchN.json``, JSON lines, summaries with a leading space), TL;DR's
three SFT layouts, TRL's layouts, UltraFeedback binarized (parquet, ``train_prefs-*``), raw
UltraFeedback rows, oasst1 trees and flat messages, SHP rows.
"""

import pytest
from public_testlib import (HH_PROMPT, HH_TWO_TURNS, OASST_COMPARISONS, POST, QUERY, TREE, flatten, message,
                            run, write_lines, write_parquet)

from rlhf_jax.data.jsonl import DataError

# ------------------------------------------------------------------------------- HH-RLHF

def test_hh_prompt_ends_at_the_last_assistant_turn(tmp_path):
    records = [
        HH_TWO_TURNS,
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},  # empty reply
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        {"chosen": "no turns at all", "rejected": "none here"},
        HH_TWO_TURNS,  # HH repeats some records
    ]
    path = write_lines(tmp_path / "helpful-base" / "train.jsonl.gz", records)
    out, summary = run("hh-rlhf", [path], tmp_path / "out")
    assert out["train"]["comparisons"] == [
        {"prompt": HH_PROMPT, "responses": [" I think a mammal.", " I think a fish."], "ranks": [0, 1]}]
    assert out["train"]["prompts"] == [{"prompt": HH_PROMPT}]
    assert summary["dropped"] == {"empty final reply": 1, "chosen == rejected": 1,
                                  "prompts differ between chosen and rejected": 1,
                                  "no \\n\\nAssistant: turn": 1, "duplicate": 1}


def test_hh_as_chat_and_chosen_as_demonstrations(tmp_path):
    path = write_lines(tmp_path / "test.jsonl", [HH_TWO_TURNS])
    out, _ = run("hh-rlhf", [path], tmp_path / "out", prompt_style="chat", chosen_as_demonstrations=True)
    turns = [{"role": "user", "content": "What is a dog?"}, {"role": "assistant", "content": "An animal."},
             {"role": "user", "content": "Which kind?"}]
    assert out["test"]["comparisons"] == [{"prompt": turns, "responses": ["I think a mammal.", "I think a fish."],
                                           "ranks": [0, 1]}]
    assert out["test"]["demonstrations"] == [{"prompt": turns, "response": "I think a mammal."}]


# ----------------------------------------------------------------- OpenAI summarization

def comparison(info, texts, choice, split):
    return {"info": info, "summaries": [{"text": t, "policy": "ref", "note": None} for t in texts],
            "choice": choice, "worker": "w1", "batch": "batch9", "split": split, "extra": {"confidence": 8}}


def test_summarize_from_feedback(tmp_path):
    article = {"id": "167f", "site": "dailymail", "title": "Sissoko faces action", "article": "Newcastle ..."}
    records = [comparison(POST, [" car accident, doors jammed.", " other party was speeding."], 1, "train"),
               comparison(article, [" Sissoko sent off.", " Newcastle lost."], 0, "valid2"),
               comparison(POST, [" same", " same "], 0, "train"),
               comparison(POST, [" ", " b"], 0, "valid1")]
    path = write_lines(tmp_path / "comparisons" / "batch9.json", records)  # JSON lines, named .json
    out, summary = run("summarize-from-feedback", [path], tmp_path / "out")
    # the record's own split: the file name says nothing
    assert out["train"]["comparisons"] == [
        {"prompt": QUERY, "responses": [" car accident, doors jammed.", " other party was speeding."], "ranks": [1, 0]}]
    assert out["valid2"]["comparisons"] == [{"prompt": "Article:\nNewcastle ...\n\nTL;DR:",
                                             "responses": [" Sissoko sent off.", " Newcastle lost."], "ranks": [0, 1]}]
    assert summary["dropped"] == {"chosen == rejected": 1, "empty summary": 1}


def test_tldr_layouts_put_the_separating_space_on_the_summary(tmp_path):
    sft = write_lines(tmp_path / "train.jsonl", [{**POST, "summary": "accident, need advice"}])
    # CarperAI's parquet: "TL;DR: " ends the prompt; TRL's tldr: the completion starts with " "
    carper = write_parquet(tmp_path / "valid-00000-of-00001.parquet",
                           [{"prompt": QUERY + " ", "label": "accident, need advice"}])
    trl_lib = write_parquet(tmp_path / "test-00000-of-00001.parquet",
                            [{"prompt": QUERY, "completion": " accident, need advice"}])
    out, _ = run("tldr", [sft, carper, trl_lib], tmp_path / "out")
    want = [{"prompt": QUERY, "response": " accident, need advice"}]
    assert out["train"]["demonstrations"] == out["valid"]["demonstrations"] == out["test"]["demonstrations"] == want


# ---------------------------------------------------------------------------------- SHP

def shp(a, b, label):
    return {"post_id": "himc90", "domain": "askculinary_train", "upvote_ratio": 0.99,
            "history": "Why does my bread not rise?", "c_root_id_A": "g2wdpuw", "c_root_id_B": "g2wcl8v",
            "created_at_utc_A": 1593535113, "created_at_utc_B": 1593531372, "score_A": 38, "score_B": 14,
            "human_ref_A": a, "human_ref_B": b, "labels": label, "seconds_difference": 3741.0, "score_ratio": 2.71}


def test_shp_labels_pick_a_or_b(tmp_path):
    path = write_lines(tmp_path / "askculinary" / "validation.json",
                       [shp("Old yeast.", "Too cold.", 1), shp("Old yeast.", "Too cold.", 0), shp("x", "x", 1)])
    out, summary = run("shp", [path], tmp_path / "out", prompt_style="text")
    prompt = "\n\nHuman: Why does my bread not rise?\n\nAssistant:"  # --prompt-style text: an HH transcript
    assert out["validation"]["comparisons"] == [
        {"prompt": prompt, "responses": [" Old yeast.", " Too cold."], "ranks": [0, 1]},
        {"prompt": prompt, "responses": [" Old yeast.", " Too cold."], "ranks": [1, 0]}]
    assert summary["dropped"] == {"chosen == rejected": 1}


# ---------------------------------------------------------------------------------- TRL

USER = [{"role": "user", "content": "What color is the sky?"}]


def said(text):
    return [{"role": "assistant", "content": text}]


def test_trl_layouts(tmp_path):
    records = [
        {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."},  # standard, explicit prompt
        {"prompt": USER, "chosen": said("Blue."), "rejected": said("Green.")},  # conversational, explicit
        {"chosen": USER + said("Blue!"), "rejected": USER + said("Green!")},  # conversational, implicit
        {"chosen": HH_TWO_TURNS["chosen"], "rejected": HH_TWO_TURNS["rejected"]},  # standard, implicit
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # implicit, no turn: no prompt
        {"prompt": USER, "completion": said("Blue.")},  # prompt-completion
        {"prompt": "The sky is", "completion": " blue."},
        {"messages": USER + said("It is blue.")},  # conversational language modelling
        {"prompt": [{"role": "user", "content": "Why?"}]},  # prompt-only
        {"text": "Plain pretraining text."},
        {"prompt": "The sky is", "completion": " blue.", "label": True},  # unpaired preference
        {"prompt": "Q", "completions": ["a", "b"], "labels": [True, False]},  # stepwise
        {"prompt": USER, "chosen": said("A") + said("B"), "rejected": said("C")},
        {"chosen": USER + said("Blue."), "rejected": [{"role": "user", "content": "Other?"}, *said("No.")]},
        {"prompt": [{"role": "tool", "content": "x"}], "completion": said("y")},
    ]
    out, summary = run("trl", [write_lines(tmp_path / "train.jsonl", records)], tmp_path / "out")
    got = out["train"]
    assert got["comparisons"] == [
        {"prompt": "The sky is", "responses": [" blue.", " green."], "ranks": [0, 1]},  # the space moved over
        {"prompt": USER, "responses": ["Blue.", "Green."], "ranks": [0, 1]},
        {"prompt": USER, "responses": ["Blue!", "Green!"], "ranks": [0, 1]},
        {"prompt": HH_PROMPT, "responses": [" I think a mammal.", " I think a fish."], "ranks": [0, 1]}]
    assert got["demonstrations"] == [{"prompt": USER, "response": "Blue."},
                                     {"prompt": "The sky is", "response": " blue."},
                                     {"prompt": USER, "response": "It is blue."}]
    assert got["prompts"] == [{"prompt": "The sky is"}, {"prompt": USER}, {"prompt": HH_PROMPT},
                              {"prompt": [{"role": "user", "content": "Why?"}]}]
    assert got["text"] == [{"text": "Plain pretraining text."}]
    assert summary["dropped"] == {
        "text pair without a prompt (no \\n\\nAssistant: turn to cut after)": 1,
        "unpaired preference (label): no ranking": 1, "stepwise supervision: no ranking": 1,
        "reply of more than one message": 1, "prompts differ between chosen and rejected": 1,
        "a role other than system/user/assistant": 1}


def test_ultrafeedback_binarized_equal_scores_tie(tmp_path):
    def row(prompt, chosen, rejected, score_chosen, score_rejected):
        user = [{"role": "user", "content": prompt}]
        return {"prompt": prompt, "prompt_id": "a1b2", "chosen": user + said(chosen),
                "rejected": user + said(rejected), "messages": user + said(chosen),
                "score_chosen": score_chosen, "score_rejected": score_rejected}

    train = write_parquet(tmp_path / "data" / "train_prefs-00000-of-00001.parquet",
                          [row("Name a fruit.", "Apple.", "Carrot.", 9.0, 6.5),
                           row("Name a color.", "Red.", "Blue.", 8.0, 8.0),  # a tie, not chosen-first
                           row("Name a day.", "Monday.", "Monday.", 7.0, 3.0)])
    test = write_parquet(tmp_path / "data" / "test_prefs-00000-of-00001.parquet",
                         [row("Name a fruit.", "Pear.", "", 5.0, 1.0)])
    out, summary = run("ultrafeedback-binarized", [tmp_path / "data"], tmp_path / "out")
    assert out["train"]["comparisons"] == [
        {"prompt": [{"role": "user", "content": "Name a fruit."}], "responses": ["Apple.", "Carrot."], "ranks": [0, 1]},
        {"prompt": [{"role": "user", "content": "Name a color."}], "responses": ["Red.", "Blue."], "ranks": [0, 0]}]
    assert "test" not in out
    assert summary["dropped"] == {"chosen == rejected": 1, "empty final reply": 1}


# ------------------------------------------------------------------------ UltraFeedback

def completion(response, ratings, overall):
    aspects = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    annotations = {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings)}
    annotations["truthfulness"].update({"Type": ["0"], "Rationale For Rating": "..."})
    return {"model": "m", "principle": "helpfulness", "custom_system_prompt": "Be helpful.", "response": response,
            "annotations": annotations, "critique": "...", "overall_score": overall, "fine-grained_score": 4.0}


def test_ultrafeedback_is_a_k_wise_ranking(tmp_path):
    row = {"source": "evol_instruct", "instruction": "Explain rain.", "models": ["a", "b", "c", "d", "e"],
           "completions": [completion("Clouds condense.", ["5", "N/A", "4", "3"], 6.0),  # mean 4.0 ("N/A" left out)
                           completion("Water falls.", ["4", "4", "4", "4"], 8.0),  # 4.0: ties the first
                           completion("Because.", ["2", "1", "N/A", "3"], 9.0),  # 2.0
                           completion("Unrated.", ["N/A"] * 4, 5.0),
                           completion("", ["5", "5", "5", "5"], 10.0)],
           "correct_answers": ["None"], "incorrect_answers": ["None"]}
    one = {**row, "completions": row["completions"][:1] + row["completions"][3:]}  # one rated response left
    path = write_lines(tmp_path / "evol_instruct.jsonl", [row, one])
    out, summary = run("ultrafeedback", [path], tmp_path / "aspects")
    prompt = [{"role": "user", "content": "Explain rain."}]
    assert out["train"]["comparisons"] == [
        {"prompt": prompt, "responses": ["Clouds condense.", "Water falls.", "Because."], "ranks": [0, 0, 1]}]
    assert summary["dropped"] == {"response: unrated": 2, "response: empty": 2, "fewer than 2 rated responses": 1}
    out, _ = run("ultrafeedback", [path], tmp_path / "overall", score="overall")
    assert out["train"]["comparisons"][0] == {
        "prompt": prompt, "responses": ["Clouds condense.", "Water falls.", "Because.", "Unrated."],
        "ranks": [2, 1, 0, 3]}


# ------------------------------------------------------------------------------- oasst1

@pytest.mark.parametrize("layout", ["trees", "messages"])
def test_oasst1_rankings_and_rank_zero_demonstrations(tmp_path, layout):
    name = f"2023-04-12_oasst_ready.{layout}.jsonl.gz"
    rows = [TREE] if layout == "trees" else flatten(TREE["prompt"])
    out, summary = run("oasst1", [write_lines(tmp_path / name, rows)], tmp_path / "out")
    assert out["train"]["comparisons"] == OASST_COMPARISONS
    assert out["train"]["demonstrations"] == [
        {"prompt": OASST_COMPARISONS[0]["prompt"], "response": "Rayleigh scattering."},
        {"prompt": OASST_COMPARISONS[1]["prompt"], "response": "Blue light scatters most."}]
    assert summary["dropped"] == {"message: deleted": 1, "message: under a dropped one": 1,
                                  "message: failed review": 1, "message: not reviewed": 1}


def test_oasst1_flat_orphans_are_dropped(tmp_path):
    rows = flatten(TREE["prompt"])
    rows = [r for r in rows if r["message_id"] != "p2"]  # a3..a5 lose their parent
    out, summary = run("oasst1", [write_parquet(tmp_path / "train-00000.parquet", rows)], tmp_path / "out")
    assert out["train"]["comparisons"] == OASST_COMPARISONS[:1]
    assert summary["dropped"]["message: parent not in the file"] == 3


def test_oasst1_keeps_the_nine_best_of_more_replies(tmp_path):
    replies = [message(f"a{i}", "assistant", f"Reply {i}.", rank=(i + 3) % 11) for i in range(11)]
    tree = {"message_tree_id": "p9", "prompt": message("p9", "prompter", "Say something.", replies=replies)}
    out, summary = run("oasst1", [write_lines(tmp_path / "t.jsonl", [tree])], tmp_path / "out")
    (got,) = out["train"]["comparisons"]
    assert got["ranks"] == [(i + 3) % 11 for i in range(11) if (i + 3) % 11 < 9]  # ranks 9 and 10 left out
    assert summary["dropped"] == {"responses beyond the 9 best": 2}


def test_malformed_records_name_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl.gz", [HH_TWO_TURNS, "", {"chosen": "x"}])
    with pytest.raises(DataError, match=r"train\.jsonl\.gz:3: missing field \"rejected\" \(is this hh-rlhf data\?"):
        run("hh-rlhf", [path], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, nothing left
    rows = flatten(TREE["prompt"])
    rows[2]["role"] = "moderator"
    with pytest.raises(DataError, match=r"x\.parquet:row 2: field \"message\.role\" is 'moderator'"):
        run("oasst1", [write_parquet(tmp_path / "x.parquet", rows)], tmp_path / "out2")
    with pytest.raises(DataError, match=r"b\.json:1: field \"choice\" must be int, got str"):
        run("summarize-from-feedback", [write_lines(tmp_path / "b.json", [
            {**comparison(POST, [" a", " b"], 0, "train"), "choice": "0"}])], tmp_path / "out3")
