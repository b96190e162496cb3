"""One stop token across the stages: SFT on conversations teaches the chat template's
end-of-turn, and sampling (``rlhf-jax sample``, comparisons collection) stops there and
records the conversation, which the reward model's loader reads back.

The tokenizer is Llama 3 style (word-level, built in the test), whose end of turn
``<|eot_id|>`` (4) is not its EOS ``<|end_of_text|>`` (1): a sampler stopping at EOS would run
on to ``max_new_tokens``.
"""

import dataclasses
import json
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "data"))  # data_testlib

from data_testlib import save_chat_tokenizer  # noqa: E402
from helpers import tiny_config  # noqa: E402

from rlhf_jax.config import DataConfig, SamplingConfig, TokenizerConfig  # noqa: E402
from rlhf_jax.data.ranking import RankingBatches  # noqa: E402
from rlhf_jax.data.tokenizer import load_tokenizer  # noqa: E402
from rlhf_jax.generate import generate_from_export  # noqa: E402
from rlhf_jax.stages.comparisons import run_comparisons  # noqa: E402
from rlhf_jax.stages.sft import run_sft  # noqa: E402

SYSTEM = {"role": "system", "content": "w0"}


class FirstIsBest:
    """Ranks responses in the order given, checking it is shown the conversation."""

    def __init__(self):
        self.prompts = []

    def rank(self, prompt, responses):
        self.prompts.append(prompt)
        return list(range(len(responses)))


def test_sft_on_conversations_then_sampling_stops_at_end_of_turn(tmp_path):
    tok_dir = save_chat_tokenizer(tmp_path / "tok", "llama3")
    conversations = [[SYSTEM, {"role": "user", "content": f"w{1 + i % 9} w{10 + i % 7}"}] for i in range(32)]
    demos = tmp_path / "demos.jsonl"  # every reply is "w3 w4": learnt in a few dozen steps
    demos.write_text("".join(json.dumps({"prompt": c, "response": "w3 w4"}) + "\n" for c in conversations))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in conversations[:8]))
    cfg = tiny_config(demos, steps=60, batch_size=8)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    prompt_data = DataConfig(train_path=str(prompts), val_path=str(prompts), batch_size=8, max_len=24)
    cfg = dataclasses.replace(
        cfg, tokenizer=TokenizerConfig(kind="hf", path=str(tok_dir)),
        generation=dataclasses.replace(cfg.generation, sampling=greedy, prompts=prompt_data),
        comparisons=dataclasses.replace(cfg.comparisons, prompts=prompt_data, n_prompts=8, k_min=2, k_max=2,
                                        sampling=greedy))
    run_sft(cfg, tmp_path / "run", show_progress=False)

    # `rlhf-jax sample --prompt TEXT`: the text is sent as a user message, the reply stops at <|eot_id|>
    ((prompt, response),) = generate_from_export(cfg, tmp_path / "run", "run:sft/export", ["w2 w11"],
                                                 chat_prompts=True)
    assert prompt == [{"role": "user", "content": "w2 w11"}]
    assert response == "w3 w4"  # would be followed by more tokens had the sampler missed the stop token
    ((prompt, response),) = generate_from_export(cfg, tmp_path / "run", "run:sft/export", [conversations[0]])
    assert (prompt, response) == (conversations[0], "w3 w4")

    labeler = FirstIsBest()
    out = run_comparisons(cfg, tmp_path / "run", labeler=labeler, show_progress=False)
    records = [json.loads(line) for name in ("train.jsonl", "val.jsonl")
               for line in (out / name).read_text().splitlines()]
    assert sorted(map(json.dumps, labeler.prompts)) == sorted(map(json.dumps, conversations[:8]))
    assert sorted(json.dumps(r["prompt"]) for r in records) == sorted(map(json.dumps, conversations[:8]))
    assert all(r["responses"] == ["w3 w4", "w3 w4"] for r in records)
    tok = load_tokenizer(tok_dir)
    batch = RankingBatches(str(out / "train.jsonl"), tok, DataConfig(train_path="-", batch_size=1, max_len=32,
                                                                     shuffle=False),
                           seed=0, cache_dir=str(tmp_path / "cache"), k_max=2).get(0)
    assert batch.tokens[0, 0, batch.last_index[0, 0]] == 4  # <|eot_id|> closes each compared reply
