"""Each real-model experiment runs 2 steps of every stage, on a tiny locally made HF
checkpoint of its architecture (nothing is downloaded)."""

import dataclasses
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.config import CheckpointConfig, load_experiment  # noqa: E402
from rlhf_jax.stages.ppo import run_ppo  # noqa: E402
from rlhf_jax.stages.rm import run_rm  # noqa: E402
from rlhf_jax.stages.sft import run_sft  # noqa: E402
from rlhf_jax.tasks import save_tokenizer  # noqa: E402
from tests.helpers import write_demonstrations, write_marker_comparisons  # noqa: E402

TINY = {
    "gpt2_hh_gpu": lambda: transformers.GPT2Config(vocab_size=168, n_positions=64, n_embd=32, n_layer=2,
                                                   n_head=4, eos_token_id=1, bos_token_id=1),
    "llama_tpu_pod": lambda: transformers.LlamaConfig(vocab_size=168, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, max_position_embeddings=64,
                                                      tie_word_embeddings=True, eos_token_id=1, bos_token_id=3),
}


def _write_data(data_dir, experiment):
    data_dir.mkdir()
    for split, seed in (("train", 0), ("val", 1)):
        demos = write_demonstrations(data_dir / f"sft_{split}.jsonl", 24, seed=seed)
        records = [json.loads(line) for line in demos.read_text().splitlines()]
        (data_dir / f"prompts_{split}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                                                for r in records))
        (data_dir / f"pretrain_{split}.jsonl").write_text("".join(
            json.dumps({"text": r["prompt"] + " " + r["response"]}) + "\n" for r in records))
        comparisons = [json.loads(line) for line in
                       write_marker_comparisons(data_dir / "tmp.jsonl", 24, seed=seed).read_text().splitlines()]
        if experiment == "gpt2_hh_gpu":  # Anthropic HH's shape: chosen / rejected
            pairs = [{"prompt": c["prompt"], "chosen": c["responses"][c["ranks"].index(0)],
                      "rejected": c["responses"][c["ranks"].index(1)]} for c in comparisons]
            (data_dir / f"rm_{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        else:
            (data_dir / f"comparisons_{split}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in comparisons))


def _small(cfg):
    """Two steps of everything, batches that fit 8 CPU devices."""
    small = lambda d, **kw: dataclasses.replace(d, max_len=32, **kw)  # noqa: E731
    ckpt = CheckpointConfig(save_every=1, keep=1)
    return dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, tensor=1),
        sft=dataclasses.replace(cfg.sft, data=small(cfg.sft.data, batch_size=8), max_steps=2, eval_every=2,
                                checkpoint=ckpt),
        rm=dataclasses.replace(cfg.rm, data=small(cfg.rm.data, batch_size=8), max_steps=2, checkpoint=ckpt,
                               init_from="run:sft/export"),
        ppo=dataclasses.replace(cfg.ppo, prompts=small(cfg.ppo.prompts, batch_size=16), iterations=2,
                                pretrain=small(cfg.ppo.pretrain, batch_size=8), minibatch_size=8,
                                eval_every=2, checkpoint=ckpt),
        generation=dataclasses.replace(cfg.generation, sampling=dataclasses.replace(cfg.generation.sampling,
                                                                                    max_new_tokens=8)))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(TINY))
def test_experiment_runs_two_steps_of_each_stage(tmp_path, monkeypatch, experiment, eight_devices):
    model_dir = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(TINY[experiment]()).save_pretrained(model_dir)
    tokenizer_dir = save_tokenizer(tmp_path / "tokenizer")  # the task's word-level HF tokenizer
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    _write_data(tmp_path / "data", experiment)
    monkeypatch.setenv("RLHF_JAX_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("RLHF_JAX_DATA_DIR", str(tmp_path / "data"))

    cfg = load_experiment(f"experiments/{experiment}.py")
    assert cfg.model.hf_path == str(model_dir) and cfg.model.d_model == 32  # read from the checkpoint
    cfg = _small(cfg)
    workdir = tmp_path / "run"
    assert run_sft(cfg, workdir, show_progress=False) is not None
    assert run_rm(cfg, workdir, show_progress=False) is not None
    assert run_ppo(cfg, workdir, show_progress=False) is not None
