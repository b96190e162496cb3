"""The reward-model stage: learns a preference, normalises, starts from SFT, one pass per response."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, parameters, sharding, steps
from rlhf_jax.config import MeshConfig
from rlhf_jax.data import SFTBatches, load_tokenizer, to_global
from rlhf_jax.logging import read_metrics
from rlhf_jax.models import ScalarModel
from rlhf_jax.stages import common
from rlhf_jax.stages.rm import run_rm
from rlhf_jax.stages.sft import run_sft
from rlhf_jax.types import RankingBatch
from tests.helpers import (TINY_MODEL, f32_rtol, forward_sums, rm_config, tiny_config, write_demonstrations,
                           write_marker_comparisons)


def _demo_rewards(export, demos, workdir):
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    model = ScalarModel(TINY_MODEL)
    params = checkpoint.load_export(export, parameters.abstract(model, mesh))
    tokenizer = load_tokenizer(common.task_files(workdir, 0)["tokenizer"])
    batches = SFTBatches(str(demos), tokenizer, tiny_config(demos).sft.data, seed=0, cache_dir=str(workdir / "c"))
    score = steps.make_score_fn(model, mesh, jax.tree.map(lambda x: x.sharding, params))
    out = []
    for local in batches.eval_batches():
        real = local.segment_ids.any(axis=1)
        batch = to_global(local, mesh)
        out.append(np.asarray(score(params, batch.tokens, batch.segment_ids, batch.positions))[real])
    return np.concatenate(out)


def test_rm_learns_a_marker_preference_and_normalises(tmp_path):
    train = write_marker_comparisons(tmp_path / "train.jsonl", 400, seed=0)
    val = write_marker_comparisons(tmp_path / "val.jsonl", 80, seed=1)
    demos = write_demonstrations(tmp_path / "demos.jsonl", 40)
    cfg = rm_config(tiny_config(demos), train, val, steps=100, batch_size=16, lr=3e-3,
                    normalize_path=demos, normalize_gain=True)
    export = run_rm(cfg, tmp_path / "run", show_progress=False)
    metrics = read_metrics(tmp_path / "run" / "rm" / "metrics.jsonl")
    accuracy = [m["val/rm_accuracy"] for m in metrics if "val/rm_accuracy" in m][-1]
    assert accuracy > 0.95, accuracy
    meta = checkpoint.read_export_meta(export)
    assert meta["reward_gain"] != 1.0 and meta["stage"] == "rm"
    rewards = _demo_rewards(export, demos, tmp_path)
    assert len(rewards) == 40
    # the export's offset and gain came from the same 40 rewards, scored then in another batch
    # layout: each reward may differ by a forward pass's sums and the mean's (tests.helpers.f32_rtol)
    bound = f32_rtol(*forward_sums(TINY_MODEL, 32), 40, ops=4) * float(np.abs(rewards).max())
    np.testing.assert_allclose(rewards.mean(), 0.0, atol=bound)
    np.testing.assert_allclose(rewards.std(), 1.0, atol=2 * bound)


def test_rm_starts_from_the_sft_backbone_and_normalises_mean_only(tmp_path):
    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    train = write_marker_comparisons(tmp_path / "train.jsonl", 16)
    cfg = rm_config(tiny_config(demos, steps=2), train, steps=3, init_from="run:sft/export",
                    normalize_path=demos)
    sft_export = run_sft(cfg, tmp_path / "run", show_progress=False)
    rm_export = run_rm(cfg, tmp_path / "run", show_progress=False)
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    from rlhf_jax.models import LanguageModel

    sft = checkpoint.load_export(sft_export, parameters.abstract(LanguageModel(TINY_MODEL), mesh))
    rm = checkpoint.load_export(rm_export, parameters.abstract(ScalarModel(TINY_MODEL), mesh))
    # the head starts at zero, so the backbone moves from step 2 on: a little after 3 steps
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(sft["backbone"]),
                                                            jax.tree.leaves(rm["backbone"]))]
    assert 0 < max(moved) < 0.05
    rewards = _demo_rewards(rm_export, demos, tmp_path)
    np.testing.assert_allclose(rewards.mean(), 0.0, atol=f32_rtol(*forward_sums(TINY_MODEL, 32), len(rewards), ops=4)
                               * float(np.abs(rewards).max()))  # as above
    assert checkpoint.read_export_meta(rm_export)["reward_gain"] == 1.0


def test_one_forward_pass_per_response_not_per_pair():
    calls = []

    class CountingModel:
        def apply(self, variables, tokens, positions, segment_ids, **kwargs):
            calls.append(tokens.shape)
            return jnp.sum(tokens, axis=-1, keepdims=True).astype(jnp.float32) * jnp.ones(tokens.shape), None

    b, k, t = 3, 9, 7  # 9 responses = 36 pairs per prompt
    batch = RankingBatch(tokens=jnp.ones((b, k, t), jnp.int32), segment_ids=jnp.ones((b, k, t), jnp.int32),
                         positions=jnp.zeros((b, k, t), jnp.int32), response_mask=jnp.ones((b, k, t)),
                         last_index=jnp.full((b, k), t - 1),
                         ranks=jnp.zeros((b, k), jnp.int32), mask=jnp.ones((b, k), bool))
    rewards = steps.ranking_rewards(CountingModel(), {}, batch)
    assert calls == [(b * k, t)]  # one call, one row per response
    assert rewards.shape == (b, k)
