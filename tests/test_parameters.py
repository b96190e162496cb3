"""rlhf_jax.parameters: one load by spec (export, HF directory, Orbax checkpoints) onto any
mesh, and one rule for "same model" (resume and export load), with a strict read of saved
model configs."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoint, parameters, sharding, steps
from rlhf_jax.config import CheckpointConfig, ConfigError, MeshConfig
from rlhf_jax.models import LanguageModel, ScalarModel
from rlhf_jax.models.hf import export_hf
from rlhf_jax.stages import common
from tests.helpers import TINY_MODEL, tiny_config, write_demonstrations

WRITE_MESH = MeshConfig(data=2, fsdp=2, tensor=2)
READ_MESH = MeshConfig(data=1, fsdp=8, tensor=1)


def _equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same LM params as an export, a HF directory and a stage's checkpoints (step 3),
    written on a 2x2x2 mesh."""
    root = tmp_path_factory.mktemp("sources")
    model = LanguageModel(TINY_MODEL)
    mesh = sharding.make_mesh(WRITE_MESH)
    state, _ = steps.create_train_state(model, optax.adam(1e-3), mesh, jax.random.PRNGKey(0))
    checkpoint.export_params(root / "sft" / "export", state.params, TINY_MODEL, {"stage": "sft"})
    export_hf(state.params, TINY_MODEL, root / "hf")
    ckpts = checkpoint.StageCheckpoints(root / "sft" / "checkpoints", CheckpointConfig())
    ckpts.save(3, state, {"step": 3, "config": {"model": dataclasses.asdict(TINY_MODEL)}})
    ckpts.close()
    return root, jax.device_get(state.params)


@pytest.mark.parametrize("spec, kind", [("run:sft/export", "export"), ("hf", "hf"),
                                        ("run:sft/checkpoints", "checkpoint"), ("sft/checkpoints/3", "checkpoint")])
def test_every_source_loads_the_same_params_onto_another_mesh(sources, spec, kind):
    root, want = sources
    spec = spec if spec.startswith("run:") else str(root / spec)
    mesh = sharding.make_mesh(READ_MESH)
    params, src = parameters.load(spec, LanguageModel(TINY_MODEL), mesh, "sft.init_from", root)
    assert src.kind == kind and src.model.d_model == TINY_MODEL.d_model
    _equal(params, want)
    _equal(parameters.shardings_of(params), parameters.shardings_of(
        jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding),
                     parameters.abstract(LanguageModel(TINY_MODEL), mesh))))


@pytest.mark.parametrize("spec, kind", [("run:sft/export", "export"), ("run:sft/checkpoints", "checkpoint"),
                                        ("hf", "hf")])
def test_a_load_into_another_architecture_names_the_fields(sources, spec, kind):
    root, _ = sources
    spec = spec if spec.startswith("run:") else str(root / spec)
    other = dataclasses.replace(TINY_MODEL, rope_theta=500000.0, norm_eps=1e-6)
    with pytest.raises(checkpoint.CheckpointError) as err:
        parameters.load(spec, LanguageModel(other), sharding.make_mesh(READ_MESH), "sft.init_from", root)
    assert "model.norm_eps: saved 1e-05, this run 1e-06" in str(err.value)
    assert "model.rope_theta: saved 10000.0, this run 500000.0" in str(err.value)
    assert "sft.init_from" in str(err.value) or kind == "export"


def test_execution_fields_may_change_on_load(sources):
    root, want = sources
    run_differently = dataclasses.replace(TINY_MODEL, remat="full", compute_dtype="bfloat16",
                                          attention_impl="xla")
    params, _ = parameters.load("run:sft/export", LanguageModel(run_differently),
                                sharding.make_mesh(READ_MESH), "f", root)
    _equal(params, want)


def test_spec_errors_name_the_field_and_what_is_there(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.policy_init='run:sft/export': nothing at .*did the stage"):
        parameters.source("run:sft/export", "ppo.policy_init", tmp_path)
    (tmp_path / "junk").mkdir()
    with pytest.raises(ConfigError, match=r"rm.init_from=.*is not an export .* a HF checkpoint .* checkpoints"):
        parameters.source(str(tmp_path / "junk"), "rm.init_from")


def test_a_scalar_model_starts_from_an_lm_backbone_or_an_rm_as_it_is(sources, tmp_path):
    root, want = sources
    mesh = sharding.make_mesh(READ_MESH)
    scalar = ScalarModel(TINY_MODEL)
    rng = parameters.scalar_head_rng(0)
    from_lm = parameters.initial(scalar, mesh, "run:sft/export", "rm.init_from", root, rng)
    _equal(from_lm["backbone"], want["backbone"])
    assert not np.any(np.asarray(from_lm["head"]["kernel"]))  # a fresh (zero) head
    rm = dict(from_lm, head={"kernel": from_lm["head"]["kernel"] + 1.0, "bias": from_lm["head"]["bias"] - 2.0})
    checkpoint.export_params(tmp_path / "rm", rm, TINY_MODEL, {"stage": "rm"})
    _equal(parameters.initial(scalar, mesh, str(tmp_path / "rm"), "ppo.value_init", None, rng), rm)
    # the RM stage's own checkpoints hold a scalar model too: taken as they are, head included
    state, _ = steps.create_train_state(scalar, optax.adam(1e-3), mesh, jax.random.PRNGKey(0), rm)
    ckpts = checkpoint.StageCheckpoints(tmp_path / "rm_checkpoints", CheckpointConfig())
    ckpts.save(1, state, {"step": 1, "config": {"model": dataclasses.asdict(TINY_MODEL)}})
    ckpts.close()
    assert parameters.source(str(tmp_path / "rm_checkpoints"), "f").scalar
    _equal(parameters.initial(scalar, mesh, str(tmp_path / "rm_checkpoints"), "ppo.value_init", None, rng), rm)
    assert parameters.initial(LanguageModel(TINY_MODEL), mesh, None, "sft.init_from", root) is None


def _export_with_model_fields(root, out, **fields):
    """A copy of the sources' export whose export.json has ``fields`` in its model config."""
    import shutil

    shutil.copytree(root / "sft" / "export", out)
    meta = json.loads((out / checkpoint.EXPORT_META).read_text())
    meta["model"].update(fields)
    (out / checkpoint.EXPORT_META).write_text(json.dumps(meta))
    return out


def test_export_configs_are_read_strictly(sources, tmp_path):
    root, _ = sources
    older = _export_with_model_fields(root, tmp_path / "older", dropout=0.1)  # older exports carried it
    assert checkpoint.export_model_config(older) == TINY_MODEL
    typo = _export_with_model_fields(root, tmp_path / "typo", n_layer=3)  # not a ModelConfig field
    with pytest.raises(checkpoint.CheckpointError, match=r"typo/export.json: invalid model config.*n_layer"):
        checkpoint.export_model_config(typo)
    ill_typed = _export_with_model_fields(root, tmp_path / "ill_typed", d_model="32")
    with pytest.raises(checkpoint.CheckpointError, match=r"invalid model config.*d_model"):
        parameters.load(str(ill_typed), LanguageModel(TINY_MODEL), sharding.make_mesh(READ_MESH), "f")


def test_a_checkpoint_without_a_model_config_is_refused_by_its_shapes(tmp_path):
    """Metadata that names no model (a checkpoint written by other code) falls back to
    comparing the stored shapes with this run's, before Orbax reads anything."""
    mesh = sharding.make_mesh(READ_MESH)
    state, _ = steps.create_train_state(LanguageModel(TINY_MODEL), optax.adam(1e-3), mesh, jax.random.PRNGKey(0))
    ckpts = checkpoint.StageCheckpoints(tmp_path / "checkpoints", CheckpointConfig())
    ckpts.save(2, state, {"step": 2})
    ckpts.wait()
    wider = LanguageModel(dataclasses.replace(TINY_MODEL, d_model=64))
    target, _ = steps.create_train_state(wider, optax.adam(1e-3), mesh, jax.random.PRNGKey(0))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2: does not match this run's state .* "
                                                         r"params.backbone.embed.embedding: stored \(168, 32\), "
                                                         r"this run \(168, 64\)"):
        ckpts.restore_newest_intact(target)
    ckpts.close()


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [
    (dict(rope_theta=500000.0), "model.rope_theta"), (dict(norm_eps=1e-6), "model.norm_eps"),
    (dict(max_len=48), "model.max_len"), (dict(param_dtype="bfloat16"), "model.param_dtype"),
    (dict(scan_layers=True), "model.scan_layers"),
])
def test_a_resume_into_another_model_is_refused_naming_the_field(tmp_path, change, field):
    """Each of these resumed silently before: the old check compared eight hand-picked fields."""
    from rlhf_jax.stages.sft import run_sft

    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    cfg = tiny_config(demos, steps=4, save_every=2)
    run_sft(cfg, tmp_path / "run", show_progress=False, stop_after=2)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **change))
    # architecture fields are among the stage's recorded inputs (rlhf_jax.provenance), which
    # refuse first; a layout field (scan_layers) is left to the checkpoint's own check
    with pytest.raises((checkpoint.CheckpointError, ConfigError),
                       match=rf"sft/checkpoints/2: written for a different model \({field}: saved|"
                             rf"sft/checkpoints/2 was made from other inputs than this run's: {field}: saved"):
        run_sft(other, tmp_path / "run", show_progress=False)
    # a knob of how the model runs may change: the run resumes and finishes
    same = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="full"))
    assert run_sft(same, tmp_path / "run", show_progress=False) is not None


def test_stage_env_falls_back_to_model_hf_path(sources):
    root, want = sources
    cfg = dataclasses.replace(tiny_config("unused.jsonl"), mesh=READ_MESH,
                              model=dataclasses.replace(TINY_MODEL, hf_path=str(root / "hf")))
    env = common.make_env(cfg, root / "envrun", "sft")
    _equal(env.initial_params(LanguageModel(cfg.model), None, "sft.init_from"), want)
    with pytest.raises(ConfigError, match="model.hf_path="):
        dataclasses.replace(env, cfg=dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, hf_path=str(root / "missing")))).initial_params(LanguageModel(cfg.model), None, "sft.init_from")


def test_convert_writes_a_hf_checkpoint_from_a_stage_checkpoints_directory(sources, tmp_path):
    """`rlhf-jax convert --to-hf` takes any LM source: here a stage's Orbax checkpoints."""
    from rlhf_jax import convert

    root, want = sources
    mesh = sharding.make_mesh(READ_MESH)
    convert.to_hf(root / "sft" / "checkpoints", tmp_path / "hf", mesh)
    params, src = parameters.load(str(tmp_path / "hf"), LanguageModel(TINY_MODEL), mesh, "--from-hf")
    assert src.kind == "hf"
    _equal(params, want)
    with pytest.raises(ConfigError, match="already a HF checkpoint"):
        convert.to_hf(root / "hf", tmp_path / "again", mesh)
