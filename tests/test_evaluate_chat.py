"""``rlhf-jax evaluate`` on a chat-template run: the gold scorer reads each held-out prompt's
user message, not the template's rendering, and the responses end at the end-of-turn token.

The run is what ``rlhf-jax sft``, ``rm`` and ``ppo`` leave on a chat model (exports of a tiny
Llama with a ChatML word-level tokenizer over the task's vocabulary, SmolLM2's template with
its default system message), made here from fresh weights: the evaluation, not training, is
under test. Decoding the prompt tokens as text, as the evaluation did, gives ``system user
<task prompt> assistant``, which the gold scorer refuses as no task prompt.
"""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))  # data_testlib

from data_testlib import save_chat_tokenizer  # noqa: E402
from helpers import TINY_MODEL, tiny_config  # noqa: E402

from rlhf_jax import checkpoint, parameters  # noqa: E402
from rlhf_jax.config import (ConfigError, DataConfig, GenerationConfig, PipelineConfig, SamplingConfig,  # noqa: E402
                             TokenizerConfig)
from rlhf_jax.data.tokenizer import load_tokenizer  # noqa: E402
from rlhf_jax.evaluation import PolicyEvaluator  # noqa: E402
from rlhf_jax.models import LanguageModel, ScalarModel  # noqa: E402
from rlhf_jax.pipeline import evaluate_run  # noqa: E402
from rlhf_jax.policy import gold_reward  # noqa: E402
from rlhf_jax.sampling import Samples  # noqa: E402
from rlhf_jax.sharding import make_mesh  # noqa: E402
from rlhf_jax.tasks import gold_score, generate_prompt, vocab  # noqa: E402

N_PROMPTS, DRAWS = 6, 2  # 6 prompts in a batch of 8 (the 8 test devices): 2 padding rows


TASK_WORDS = tuple(w for w in vocab.VOCAB if w not in (vocab.PAD, vocab.EOS, vocab.UNK, vocab.BOS))


def _run_with_exports(tmp_path):
    """A chat config and a run directory holding sft, rm and ppo exports (fresh weights)."""
    tok_dir = save_chat_tokenizer(tmp_path / "tok", "chatml", words=TASK_WORDS)
    rng = np.random.default_rng(0)
    conversations = [[{"role": "user", "content": generate_prompt(rng)}] for _ in range(N_PROMPTS)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in conversations))
    model = dataclasses.replace(TINY_MODEL, vocab_size=8 * -(-(7 + len(TASK_WORDS)) // 8))
    cfg = tiny_config(prompts, model=model)
    prompt_data = DataConfig(train_path=str(prompts), val_path=str(prompts), batch_size=8, max_len=40)
    cfg = dataclasses.replace(
        cfg, tokenizer=TokenizerConfig(kind="hf", path=str(tok_dir)),
        generation=GenerationConfig(sampling=SamplingConfig(max_new_tokens=6, temperature=1.0), prompts=prompt_data),
        pipeline=PipelineConfig(methods=("ppo",), best_of_n=0, frontier=(), eval_samples=DRAWS, heldout_prompts=None,
                                eval_texts=DataConfig(train_path="task:pretrain", val_path=None)))
    workdir = tmp_path / "run"
    mesh = make_mesh(cfg.mesh)
    for stage, module, seed, extra in (("sft", LanguageModel(model), 0, {}), ("ppo", LanguageModel(model), 1, {}),
                                       ("rm", ScalarModel(model), 2, {"reward_offset": 0.0, "reward_gain": 1.0})):
        params, _ = parameters.create(module, mesh, jax.random.PRNGKey(seed))
        checkpoint.export_params(workdir / stage / "export", params, model, {"stage": stage, **extra})
    (workdir / "rm" / "metrics.jsonl").write_text(json.dumps({"step": 8, "val/rm_accuracy": 0.625}) + "\n")
    return cfg, workdir, conversations


def test_evaluate_scores_a_chat_runs_policies_on_the_user_message(tmp_path, monkeypatch):
    cfg, workdir, conversations = _run_with_exports(tmp_path)
    generated = []  # every Generations the evaluation makes: sft greedy, sft draws 1-2, ppo greedy, ppo draws
    generate = PolicyEvaluator.generate
    monkeypatch.setattr(PolicyEvaluator, "generate",
                        lambda self, *a, **k: generated.append(generate(self, *a, **k)) or generated[-1])

    report = evaluate_run(cfg, workdir)

    assert len(generated) == 2 * (1 + DRAWS)
    for generations in generated:
        assert generations.prompts == conversations  # as the file gives them, the padding rows left out
        for response in generations.responses:  # the stop token and the template's markers never in the text
            assert "<|im_end|>" not in response and "<|im_start|>" not in response
    task_prompts = [c[-1]["content"] for c in conversations]

    def gold(generations):
        return np.array([gold_score(p, r, e) for p, r, e in
                         zip(task_prompts, generations.responses, generations.ended, strict=True)])

    sft_greedy, sft_draws = gold(generated[0]), np.stack([gold(g) for g in generated[1:1 + DRAWS]])
    ppo_greedy, ppo_draws = gold(generated[1 + DRAWS]), np.stack([gold(g) for g in generated[2 + DRAWS:]])
    # float64 means of at most 12 scores in [0, 1] on both sides, summed in another order: 1e-12 is loose
    assert report["sft"]["greedy"]["gold_score"] == pytest.approx(sft_greedy.mean(), abs=1e-12)
    assert report["sft"]["sampled"]["gold_score"] == pytest.approx(sft_draws.mean(), abs=1e-12)
    assert report["ppo"]["greedy"]["gold_score"] == pytest.approx(ppo_greedy.mean(), abs=1e-12)

    wins = np.where(ppo_draws > sft_draws, 1.0, np.where(ppo_draws == sft_draws, 0.5, 0.0))  # [draws, prompts]
    per_prompt = wins.mean(axis=0)  # a prompt's draws are one observation
    sampled = report["ppo"]["sampled"]
    # float32 (the report's jnp arithmetic) over 12 outcomes in {0, 0.5, 1}: within 1e-6 of float64
    assert sampled["win_rate_vs_sft"] == pytest.approx(wins.mean(), abs=1e-6)
    assert sampled["win_rate_vs_sft_stderr"] == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(N_PROMPTS), abs=1e-6)
    assert sampled["gold_score_stderr"] == pytest.approx(ppo_draws.mean(axis=0).std(ddof=1) / np.sqrt(N_PROMPTS),
                                                         abs=1e-6)
    assert "kl_to_sft" in sampled and "pretrain_loss" not in report["ppo"]  # no eval texts: no pretraining pass
    assert report["rm"]["val_accuracy"] == 0.625 and "comparisons" not in report  # the run collected none

    markdown = (workdir / "report.md").read_text()
    assert task_prompts[0] in markdown  # sample rows show the user's message
    with pytest.raises(ConfigError, match="--overwrite"):  # a report is never replaced unasked
        evaluate_run(cfg, workdir)


def test_evaluate_needs_the_runs_sft_and_rm_exports(tmp_path):
    cfg = tiny_config(tmp_path / "unused.jsonl")
    (tmp_path / "run" / "sft" / "export").mkdir(parents=True)  # unfinished: no export.json
    with pytest.raises(ConfigError, match=r"sft/export is not a finished export.*rlhf-jax sft"):
        evaluate_run(cfg, tmp_path / "run")


def test_the_gold_reward_reads_the_user_message_of_a_rendered_prompt(tmp_path):
    """PPO against the gold scorer (``--reward gold``) on a chat run: the episode's prompt
    tokens are the template's rendering; the scorer gets the user message back."""
    tokenizer = load_tokenizer(save_chat_tokenizer(tmp_path / "tok", "chatml", words=TASK_WORDS))
    prompt = "sort ascending : 10 7 18 =>"
    ids = tokenizer.encode_prompt([{"role": "user", "content": prompt}])
    reply = [*tokenizer.encode("7 10 18"), tokenizer.eos_id]
    pad = tokenizer.pad_id
    samples = Samples(prompt_tokens=np.array([[pad, *ids], [pad] * (1 + len(ids))], np.int32),  # row 2: padding
                      prompt_segments=np.array([[0] + [1] * len(ids), [0] * (1 + len(ids))], np.int32),
                      tokens=np.array([reply + [pad], [pad] * (1 + len(reply))], np.int32),
                      logprobs=np.zeros((2, 1 + len(reply)), np.float32),
                      mask=np.array([[True] * len(reply) + [False], [False] * (1 + len(reply))]),
                      ended=np.array([True, False]))
    scores = np.asarray(gold_reward(tokenizer)(None, samples))
    assert gold_score(prompt, "7 10 18") == 1.0  # the right answer, ended
    np.testing.assert_array_equal(scores, [1.0, 0.0])  # the padding row scores 0


def test_evaluate_refuses_held_out_prompts_it_would_cut(tmp_path):
    """A prompt cut to ``generation.prompts.max_len`` loses its head (or the template's start
    and the message's first words): the gold scorer could not read it."""
    cfg, workdir, _ = _run_with_exports(tmp_path)
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(
        cfg.generation, prompts=dataclasses.replace(cfg.generation.prompts, max_len=16)))
    with pytest.raises(ConfigError, match=r"6 of its 6 prompts are longer than generation.prompts.max_len=16"):
        evaluate_run(cfg, workdir)
