"""LoRA through the stages (docs/lora.md): SFT trains adapters on a base and exports the merged
model and a PEFT adapter; a resume needs the same adapter settings; the RM starts from the
merged SFT model; PPO's policy is those weights + fresh adapters with the weights themselves
(adapters off) as its KL reference, and holds optimiser state and an EMA for the adapters only."""

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import checkpoint, parameters, sharding
from rlhf_jax.config import ConfigError, DataConfig, LoRAConfig, MeshConfig, PPOConfig, SamplingConfig
from rlhf_jax.logging import read_metrics
from rlhf_jax.models import LanguageModel, lora
from rlhf_jax.stages.ppo import run_ppo
from rlhf_jax.stages.rm import run_rm
from rlhf_jax.stages.sft import run_sft
from tests.helpers import TINY_MODEL, rm_config, tiny_config, write_demonstrations, write_marker_comparisons

ADAPTERS = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)


def _embedding(export):
    """The export's token embedding (frozen under LoRA: every stage must hand it on as it was)."""
    with ocp.StandardCheckpointer() as ckptr:
        return np.asarray(ckptr.restore(export / "params")["backbone"]["embed"]["embedding"])


@pytest.mark.slow
def test_lora_runs_sft_rm_ppo_through_merged_exports(tmp_path):
    run = tmp_path / "run"
    demos = write_demonstrations(tmp_path / "demos.jsonl", 32)
    comparisons = write_marker_comparisons(tmp_path / "comparisons.jsonl", 16)
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    # a bfloat16 frozen base (float32 adapters), scanned and rematerialised layers, as the 1B experiments run
    model = dataclasses.replace(TINY_MODEL, param_dtype="bfloat16", scan_layers=True, remat=True)
    base, _ = parameters.create(LanguageModel(model), mesh, jax.random.PRNGKey(7))  # the "pretrained" model
    base_export = checkpoint.export_params(tmp_path / "base", base, model)
    cfg = tiny_config(demos, steps=4, save_every=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, lora=ADAPTERS))

    with pytest.raises(ConfigError, match="model.lora.rank=4: LoRA trains adapters on trained weights"):
        run_sft(cfg, run, show_progress=False)  # no base named: random weights would be adapted
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, init_from=str(base_export)))
    assert run_sft(cfg, run, show_progress=False, stop_after=2) is None
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=dataclasses.replace(ADAPTERS, rank=8)))
    with pytest.raises(checkpoint.CheckpointError, match="model.lora"):  # the checkpoint holds rank-4 adapters
        run_sft(other, run, show_progress=False)
    sft = run_sft(cfg, run, show_progress=False)  # resumes at step 2

    (first,) = [m for m in read_metrics(run / "sft" / "metrics.jsonl") if "params/trainable" in m]
    # 2 layers x (q 32*4+4*32, k 32*4+4*16, v the same, o 32*4+4*32, gate and up 32*4+4*64, down 64*4+4*32)
    assert first["params/trainable"] == 2 * (256 + 192 + 192 + 256 + 384 + 384 + 384) == 4096
    assert first["optim/state_bytes"] <= 2 * 4 * 4096 + 16  # Adam's moments for the adapters only
    meta = json.loads((sft / "export.json").read_text())
    assert meta["model"]["lora"]["rank"] == 0 and meta["lora"]["rank"] == 4  # the merged model
    np.testing.assert_array_equal(_embedding(sft), np.asarray(base["backbone"]["embed"]["embedding"]))
    adapter = json.loads((run / "sft" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["r"], adapter["base_model_name_or_path"]) == ("LORA", 4, str(base_export))

    cfg = rm_config(cfg, comparisons, steps=2, init_from="run:sft/export", normalize_path=demos)
    rm = run_rm(cfg, run, show_progress=False)
    assert json.loads((rm / "export.json").read_text())["model"]["lora"]["rank"] == 0
    np.testing.assert_array_equal(_embedding(rm), _embedding(sft))  # the RM's base is the SFT model

    cfg = dataclasses.replace(cfg, ppo=PPOConfig(
        prompts=DataConfig(train_path="task:prompts", val_path=None, batch_size=16, max_len=16),
        pretrain=DataConfig(train_path="task:pretrain", val_path=None, batch_size=8, max_len=32),
        minibatch_size=8, iterations=2, old_logprobs="recompute",
        checkpoint=dataclasses.replace(PPOConfig().checkpoint, save_every=1)),
        generation=dataclasses.replace(cfg.generation, sampling=SamplingConfig(max_new_tokens=6)))
    ppo = run_ppo(cfg, run, show_progress=False)
    metrics = read_metrics(run / "ppo" / "metrics.jsonl")
    counts = {k: v for m in metrics if m["step"] == 0 for k, v in m.items()}
    assert counts["policy/params/trainable"] == 4096
    assert counts["value/params/trainable"] == 4096 + 32 + 1  # the same adapters + the head: kernel [32, 1], bias
    # iteration 1: fresh adapters (B = 0) against the base with adapters off: the same policy;
    # iteration 2: the adapters moved, the reference did not (were it the policy itself, KL would stay 0)
    kls = [m["ppo/kl_to_ref"] for m in metrics if "ppo/kl_to_ref" in m]
    assert kls[0] == 0.0 and kls[1] != 0.0
    saved = checkpoint.read_step_state_metadata(run / "ppo" / "checkpoints" / "2")
    assert not lora.base_params(saved["ema_params"])  # the EMA holds the adapters only
    policy_moments = [leaf.shape for leaf in jax.tree.leaves(saved["policy"]["opt_state"]) if len(leaf.shape) > 1]
    assert sorted(policy_moments) == sorted(2 * [leaf.shape for leaf in jax.tree.leaves(
        lora.adapter_params(saved["policy"]["params"]))])
    np.testing.assert_array_equal(_embedding(ppo), _embedding(sft))  # the policy's base stayed the SFT model
    assert (run / "ppo" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_and_rloo_with_lora_train_adapters_against_the_base(tmp_path):
    """The methods' seam with LoRA: DPO's reference and RLOO's KL reference are the policy's
    own base with the adapters off (no second copy), and only the adapters train."""
    import math

    from rlhf_jax.stages.table import BY_NAME, RunOptions
    from tests.stages.test_methods import count_target, methods_config

    run = tmp_path / "run"
    cfg = methods_config(tmp_path)
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    base, _ = parameters.create(LanguageModel(cfg.model), mesh, jax.random.PRNGKey(7))
    base_export = checkpoint.export_params(tmp_path / "base", base, cfg.model)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=ADAPTERS),
                              sft=dataclasses.replace(cfg.sft, init_from=str(base_export)))
    run_sft(cfg, run, show_progress=False)

    BY_NAME["dpo"].run(cfg, run, RunOptions(show_progress=False))
    rows = read_metrics(run / "dpo" / "metrics.jsonl")
    assert next(r for r in rows if "params/trainable" in r)["params/trainable"] == 4096
    losses = [r["dpo/loss"] for r in rows if "dpo/loss" in r]
    # fresh adapters (B = 0): the policy is its base, every log-ratio 0 and the loss log 2 (as
    # in test_methods: the two passes round ~50-sized f32 sums apart, beta 0.1 leaves ~1e-7);
    # after one step the adapters moved and the base did not: were the reference the policy
    # itself, the loss would stay log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < math.log(2) - 1e-4
    assert (run / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    np.testing.assert_array_equal(_embedding(run / "dpo" / "export"), _embedding(run / "sft" / "export"))

    BY_NAME["rloo"].run(cfg, run, RunOptions(show_progress=False, reward_fn=count_target))
    rows = read_metrics(run / "rloo" / "metrics.jsonl")
    assert next(r for r in rows if "policy/params/trainable" in r)["policy/params/trainable"] == 4096
    kls = [r["rloo/kl_to_ref"] for r in rows if "rloo/kl_to_ref" in r]
    assert abs(kls[0]) < 1e-3 and kls[1] != 0.0  # sampled from the base first, then the adapters moved
    saved = checkpoint.read_step_state_metadata(run / "rloo" / "checkpoints" / "2")
    assert not lora.base_params(saved["ema_params"])  # the EMA holds the adapters only
    assert (run / "rloo" / "adapter" / "adapter_model.safetensors").is_file()
