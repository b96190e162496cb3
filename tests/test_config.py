"""Config: experiment files, dotted overrides, saved-config round trip, clear errors."""

import dataclasses
import json

import pytest

from rlhf_jax.config import (Config, ConfigError, ModelConfig, apply_overrides, config_from_dict,
                             load_config, load_experiment, save_config, to_dict)
from rlhf_jax.default_config import default_config


def test_overrides_reach_nested_fields_with_their_types():
    cfg = apply_overrides(default_config(), ["--model.d_model=256", "--sft.optim.learning_rate=3e-4",
                                             "--model.family=gpt2", "--model.n_kv_heads=None",
                                             "--sft.data.packing=True"])
    assert cfg.model.d_model == 256 and cfg.sft.optim.learning_rate == 3e-4
    assert cfg.model.family == "gpt2" and cfg.model.n_kv_heads is None and cfg.sft.data.packing is True
    assert cfg.sft.epochs == default_config().sft.epochs  # untouched fields keep the experiment's values


@pytest.mark.parametrize("arg, expected", [
    ("--model.no_such_field=3", "no_such_field"),
    ("--model.d_model=big", "d_model"),
    ("--model.family=gpt5", "family"),
])
def test_unknown_or_ill_typed_override_is_an_error(arg, expected, capsys):
    with pytest.raises(SystemExit):
        apply_overrides(default_config(), [arg])
    assert expected in capsys.readouterr().err.replace("-", "_")


def test_saved_config_round_trips(tmp_path):
    cfg = apply_overrides(default_config(), ["--seed=7", "--sft.max_steps=11"])
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


def test_config_from_dict_rejects_unknown_and_ill_typed_fields():
    data = to_dict(default_config())
    data["model"]["n_layer"] = 4  # a typo of n_layers
    with pytest.raises(ConfigError, match="n_layer"):
        config_from_dict(data)
    data = to_dict(default_config())
    data["model"]["d_model"] = "128"
    with pytest.raises(ConfigError, match="d_model"):
        config_from_dict(data)


def test_removed_model_dropout_is_refused_with_where_it_went():
    data = to_dict(default_config())
    data["model"]["dropout"] = 0.1
    with pytest.raises(ConfigError, match=r"model.dropout was removed; .*sft.dropout"):
        config_from_dict(data, "run/config.json")
    with pytest.raises(ConfigError, match=r"override: model.dropout was removed"):
        apply_overrides(default_config(), ["--model.dropout=0.1"])


def test_removed_fields_at_their_old_default_are_dropped_from_saved_configs():
    """Every run directory written before the removal saved model.dropout 0.0 and
    ppo.stage_name 'ppo'; such a config.json still loads (a rerun resumes)."""
    data = to_dict(default_config())
    data["model"]["dropout"] = 0.0
    data["ppo"]["stage_name"] = "ppo"
    assert config_from_dict(data) == default_config()
    data["ppo"]["stage_name"] = "mine"
    with pytest.raises(ConfigError, match=r"ppo.stage_name was removed; .*--stage NAME"):
        config_from_dict(data, "run/config.json")


@pytest.mark.parametrize("field", ["pretrain", "sft", "rm"])
def test_stage_dropout_out_of_range_names_the_field(field):
    with pytest.raises(ConfigError, match=rf"{field}.dropout must be in \[0, 1\)"):
        apply_overrides(default_config(), [f"--{field}.dropout=1.5"])


@pytest.mark.parametrize("change, message", [
    (dict(d_model=100, n_heads=3), "model.d_model=100 is not divisible by model.n_heads=3"),
    (dict(n_heads=4, n_kv_heads=3), "model.n_heads=4 is not a multiple of model.n_kv_heads=3"),
    (dict(family="gpt2", n_kv_heads=2), "gpt2 family has no grouped-query attention"),
    (dict(n_layers=0), "model.n_layers must be positive"),
])
def test_invalid_model_config_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(ModelConfig(family="llama"), **change).validate()


def test_experiment_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no experiment file"):
        load_experiment(tmp_path / "missing.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_experiment(tmp_path / "bad.py")


def test_experiments_in_repo_load():
    import pathlib

    for path in sorted(pathlib.Path(__file__).parents[1].glob("experiments/*.py")):
        assert isinstance(load_experiment(path).validate(), Config), path


def test_corrupt_saved_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"seed": 1,')
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"seed": "one"}))
    with pytest.raises(ConfigError, match="seed"):
        load_config(tmp_path / "config.json")


def test_collected_comparisons_with_more_responses_than_the_rm_pads_to_are_refused_up_front():
    cfg = Config()
    too_many = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, k_max=4))
    with pytest.raises(ConfigError, match=r"comparisons.k_max=9 is larger than rm.k_max=4"):
        too_many.validate()
    # the RM reading a file of its own is checked against that file when it is read
    own = dataclasses.replace(too_many.rm, data=dataclasses.replace(too_many.rm.data, train_path="mine.jsonl",
                                                                     val_path=None))
    dataclasses.replace(too_many, rm=own).validate()


def test_a_config_saved_before_the_generation_block_reads_with_its_sampling_moved():
    """Run directories written before issue 28 hold ppo.sampling, ppo.eval_temperature and
    pipeline.run_ppo_ptx / run_ppo_gold: they read with those values in generation.sampling,
    generation.eval_temperature and pipeline.methods."""
    data = to_dict(default_config())
    generation = data.pop("generation")
    data["ppo"]["sampling"] = dict(generation["sampling"], temperature=0.7)
    data["ppo"]["eval_temperature"] = 0.0
    data["pipeline"].pop("methods")
    data["pipeline"].update(run_ppo_ptx=False, run_ppo_gold=True)
    cfg = config_from_dict(data, "old/config.json")
    assert cfg.generation.sampling.temperature == 0.7 and cfg.generation.eval_temperature == 0.0
    assert cfg.pipeline.methods == ("ppo", "ppo_gold")
    data["generation"] = {"sampling": generation["sampling"]}  # both places: which one was meant?
    with pytest.raises(ConfigError, match=r"old/config.json: both ppo.sampling .* and generation.sampling"):
        config_from_dict(data, "old/config.json")


def test_overriding_a_moved_field_names_where_it_went():
    with pytest.raises(ConfigError, match=r"ppo.sampling was removed; it is generation.sampling now"):
        apply_overrides(default_config(), ["--ppo.sampling.temperature=0.5"])
    with pytest.raises(ConfigError, match=r"pipeline.run_ppo_gold was removed; list the runs in pipeline.methods"):
        apply_overrides(default_config(), ["--pipeline.run_ppo_gold=True"])
    cfg = apply_overrides(default_config(), ["--pipeline.methods", "ppo", "grpo", "dpo", "--grpo.group_size=8"])
    assert cfg.pipeline.methods == ("ppo", "grpo", "dpo") and cfg.grpo.group_size == 8


@pytest.mark.parametrize("override, message", [
    ("--grpo.group_size=1", "grpo.group_size must be >= 2"),
    ("--dpo.beta=0", "dpo.beta must be > 0"),
    ("--dpo.label_smoothing=0.1", None),
    ("--pipeline.frontier", "pipeline.frontier"),
])
def test_method_blocks_validate_their_fields(override, message):
    if message is None:  # cDPO's smoothing is valid for the sigmoid loss, refused for another kind
        apply_overrides(default_config(), [override])
        with pytest.raises(ConfigError, match="dpo.label_smoothing=0.1 applies to kind='sigmoid' only"):
            apply_overrides(default_config(), [override, "--dpo.kind=ipo"])
        return
    args = [override, "0"] if override == "--pipeline.frontier" else [override]
    with pytest.raises(ConfigError, match=message):
        apply_overrides(default_config(), args)
