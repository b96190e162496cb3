"""``rlhf-jax compile``: TPU topology names, and (where libtpu is installed, as in CI) a tiny
model's SFT programs compiled for a v5e:2x2 slice on this CPU, with splash attention, their
per-chip bytes in the JSON, and the refusal naming a program that does not fit."""

import json
import os

import pytest

from rlhf_jax.aot import command, topology
from rlhf_jax.aot.topology import parse_topology
from rlhf_jax.config import ConfigError

# CI installs the tpu extra and sets RLHF_JAX_TPU_TESTS=required: there a missing libtpu fails these
# tests instead of skipping them
needs_libtpu = pytest.mark.skipif(not topology.libtpu_available() and os.environ.get("RLHF_JAX_TPU_TESTS") != "required",
                                  reason="libtpu (the tpu extra) is not installed")


@pytest.mark.parametrize("name, slices, generation, grid, chips, hosts", [
    ("v4-8", 1, "v4", (2, 2, 1), 4, 1),  # v4-N counts TensorCores: 4 chips
    ("v5e:2x2", 1, "v5e", (2, 2), 4, 1),
    ("v5e-16", 1, "v5e", (4, 4), 16, 4),
    ("v5e-256", 1, "v5e", (16, 16), 256, 64),
    ("v5litepod-8", 1, "v5litepod", (2, 4), 8, 1),  # one 8-chip host
    ("v5p-128", 1, "v5p", (4, 4, 4), 64, 16),
    ("v5p:2x4x4", 1, "v5p", (2, 4, 4), 32, 8),
    ("v6e:4x4", 1, "v6e", (4, 4), 16, 4),
    ("v5e-256", 2, "v5e", (16, 16), 512, 128),  # multi-slice
])
def test_topology_names(name, slices, generation, grid, chips, hosts):
    t = parse_topology(name, slices)
    assert (t.generation, t.grid, t.chips, t.hosts) == (generation, grid, chips, hosts)


@pytest.mark.parametrize("name, message", [
    ("v5p-31", r"v5p-N counts TensorCores \(2 a chip\)"),
    ("v9-8", "generation one of"),
    ("v5e:2x2x2", "a v5e grid has 2 dimensions"),
    ("tpu", "expected <generation>-<count>"),
])
def test_unknown_topologies_are_refused_naming_them(name, message):
    with pytest.raises(ConfigError, match=message):
        parse_topology(name)


def test_without_libtpu_compile_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    assert command.main(["--topology", "v5e:2x2", "--stages", "sft"]) == 2
    assert "needs libtpu: pip install -e '.[tpu]'" in capsys.readouterr().err


@needs_libtpu
def test_a_multi_slice_topology_has_every_slice_s_devices():
    devices = topology.topology_devices(parse_topology("v5e:2x2", slices=2))
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    assert {d.device_kind for d in devices} == {"TPU v5 lite"}


@needs_libtpu
# conftest's persistent compilation cache stores the TPU executables, and a second run cannot
# load them back without a TPU client: JAX says so and compiles afresh
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_a_tiny_sft_compiles_for_v5e_2x2_and_what_does_not_fit_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """The embedded default's SFT train and eval steps at 8 x 128 tokens (so splash attention
    takes the 128-token rows), compiled for 4 TPU v5e chips. A chip of 64 KiB holds neither:
    exit 3, each named with its bytes, and the JSON still holds every figure."""
    small_chip = topology.Chip("v5e", "TPU v5 lite", 197e12, 64 * 1024, 819e9, "test")
    monkeypatch.setitem(topology.CHIPS, "v5e", small_chip)
    out = tmp_path / "v5e.json"
    rc = command.main(["--topology", "v5e:2x2", "--stages", "sft", "--json", str(out),
                       "--sft.data.max_len=128", "--sft.data.batch_size=8"])
    report = json.loads(out.read_text())
    programs = {p["program"]: p for p in report["programs"]}
    assert set(programs) == {"train_step", "eval_step"} and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    for p in programs.values():
        total = p["bytes_per_chip"]["total"]
        assert 64 * 1024 < total < 2 ** 30 and not p["fits"]  # a tiny model: megabytes a chip
        assert p["fused_attention"]  # the Pallas splash kernel, compiled by libtpu for v5e
        assert p["estimate"]["total"] > 0 and p["roofline_s"] > 0
    assert programs["train_step"]["estimate"]["gradients"] > 0 and programs["train_step"]["xla_flops_per_chip"] > 0
    assert rc == command.EXIT_DOES_NOT_FIT
    err = capsys.readouterr().err
    for name in ("sft/train_step", "sft/eval_step"):
        total = programs[name.split("/")[1]]["bytes_per_chip"]["total"]
        assert f"{name} needs {total / 2 ** 30:.2f} GiB per chip ({total} bytes" in err


@pytest.mark.parametrize("experiment, topology_name", [("llama_1b_v5e", "v5e-16"), ("llama3_8b_v5p", "v5p-64")])
def test_the_pod_experiments_are_valid_configs_for_their_slices(experiment, topology_name):
    """What `rlhf-jax compile` reads for docs/tpu.md's runs: valid configs whose batches
    split over the slice's chips (the compiles themselves take minutes: documented commands)."""
    from rlhf_jax.config import load_experiment

    cfg = load_experiment(f"experiments/{experiment}.py").validate()
    chips = parse_topology(topology_name).chips
    batch_shards = chips // cfg.mesh.tensor
    assert chips % cfg.mesh.tensor == 0 and cfg.sft.data.batch_size % batch_shards == 0
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.stacked and cfg.model.max_len % 128 == 0


def test_the_pipeline_s_stages_follow_pipeline_methods():
    """`--stages pipeline` (what `tpu.py launch -- pipeline` compiles) is what run_pipeline runs:
    the larger RM's pretraining and SFT too, and the methods of pipeline.methods in their order."""
    import dataclasses

    from rlhf_jax.aot.stages import resolve
    from rlhf_jax.default_config import default_config

    cfg = default_config()
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, methods=("grpo", "dpo", "ppo_ptx")))
    assert command.stages_of("pipeline,best-of-n") == ("pipeline", "best_of_n")
    assert resolve(("pipeline", "dpo", "best_of_n"), cfg) == (
        "pretrain", "sft", "comparisons", "rm", "grpo", "dpo", "ppo_ptx", "best_of_n")
    larger = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, model=cfg.model))
    assert resolve(("pipeline",), larger)[:4] == ("pretrain", "sft", "pretrain_large", "sft_large")
    with pytest.raises(ConfigError, match="--stages='dpo,kto'"):
        command.stages_of("dpo,kto")


# what each method's stage runs (stages/dpo.py, stages/online.py, stages/best_of_n.py)
# (GRPO's held-out evaluation, the same builders as RLOO's, is left out to save its compiles)
METHOD_PROGRAMS = {
    "dpo": {"train_step", "eval_step", "reference_logprobs"},
    "rloo": {"sampler", "experience", "update", "eval_sampler", "eval_score", "eval_kl", "eval_pretrain_loss"},
    "grpo": {"sampler", "experience", "update"},
    "best_of_n": {"sampler", "score", "kl"},
}


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
@pytest.mark.slow
def test_the_methods_compile_for_v5e_2x2_and_what_does_not_fit_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """DPO, RLOO, GRPO and best-of-n on the embedded default (tiny model, short rows: XLA's
    attention), compiled for 4 TPU v5e chips: every program each stage runs, the train steps'
    states donated (their outputs overwrite them), and on a 64 KiB chip each refused by name."""
    small_chip = topology.Chip("v5e", "TPU v5 lite", 197e12, 64 * 1024, 819e9, "test")
    monkeypatch.setitem(topology.CHIPS, "v5e", small_chip)
    out = tmp_path / "methods.json"
    rc = command.main(["--topology", "v5e:2x2", "--stages", "dpo,rloo,grpo,best-of-n", "--json", str(out), "--jobs", "2",
                       "--dpo.data.batch_size=4", "--dpo.k_max=2", "--rloo.prompts.batch_size=4",
                       "--rloo.group_size=2", "--rloo.minibatch_size=8", "--grpo.prompts.batch_size=4",
                       "--grpo.group_size=2", "--grpo.minibatch_size=4", "--grpo.prompts.val_path=None",
                       "--grpo.pretrain.val_path=None", "--generation.prompts.batch_size=4"])
    report = json.loads(out.read_text())
    compiled = {}
    for p in report["programs"]:
        compiled.setdefault(p["stage"], {})[p["program"]] = p
    assert {stage: set(programs) for stage, programs in compiled.items()} == METHOD_PROGRAMS
    for stage, name in (("dpo", "train_step"), ("rloo", "update"), ("grpo", "update")):
        program = compiled[stage][name]
        # the donated state: its params and optimiser state at least, aliased to the outputs
        assert program["bytes_per_chip"]["aliased"] >= program["estimate"]["params"] + program["estimate"]["optimizer"] > 0
        assert program["estimate"]["gradients"] > 0
    # the sampler draws group_size copies of each prompt; the held-out evaluation each prompt once
    rloo = compiled["rloo"]
    assert rloo["sampler"]["bytes_per_chip"]["arguments"] > rloo["eval_sampler"]["bytes_per_chip"]["arguments"]
    assert rc == command.EXIT_DOES_NOT_FIT
    err = capsys.readouterr().err
    for stage, programs in compiled.items():
        for name, p in programs.items():
            total = p["bytes_per_chip"]["total"]
            assert 64 * 1024 < total < 2 ** 30 and not p["fits"]
            assert f"{stage}/{name} needs {total / 2 ** 30:.2f} GiB per chip ({total} bytes" in err
