"""tpu_scripts/tpu.py: the exact gcloud commands for a pod slice (dry run, no network), and
the rlhf-jax command it launches parses with the CLI's real parser and config overrides."""

import importlib.util
import pathlib
import shlex

import pytest

from rlhf_jax import cli
from rlhf_jax.config import apply_overrides, load_experiment

REPO = pathlib.Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("tpu_script", REPO / "tpu_scripts" / "tpu.py")
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

WHERE = ["--name", "rlhf", "--zone", "us-east5-a", "--project", "my-proj"]


def dry_run(capsys, subcommand: str, *args: str) -> list[list[str]]:
    """The commands ``tpu.py <subcommand> --dry-run`` prints, each split like a shell would."""
    assert tpu.main([subcommand, *WHERE, "--dry-run", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_create_a_v5p_32_slice(capsys):
    assert dry_run(capsys, "create", "--accelerator-type", "v5p-32") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "rlhf", "--zone=us-east5-a", "--project=my-proj",
         "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]]


def test_create_as_a_queued_spot_resource(capsys):
    assert dry_run(capsys, "create", "--accelerator-type", "v5p-32", "--queued", "--spot") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "rlhf-qr", "--node-id=rlhf",
         "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5",
         "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "rlhf-qr", "--zone=us-east5-a",
         "--project=my-proj", "--format=value(state.state)"]]


@pytest.mark.parametrize("accelerator, version", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base")])
def test_runtime_version_follows_the_generation(accelerator, version):
    assert tpu.runtime_version(accelerator) == version


def test_unknown_accelerator_is_an_error(capsys):
    assert tpu.main(["create", *WHERE, "--dry-run", "--accelerator-type", "v9x-8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "v9x-8" in captured.err


def _remote(command: list[str]) -> str:
    (flag,) = [a for a in command if a.startswith("--command=")]
    return flag[len("--command="):]


def test_setup_copies_this_checkout_to_every_worker_and_installs_it(capsys):
    archive, scp, ssh = dry_run(capsys, "setup", "--mount-bucket", "my-bucket")
    assert archive == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "--output=/tmp/rlhf_jax.tar.gz", "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/rlhf_jax.tar.gz", "rlhf:/tmp/rlhf_jax.tar.gz",
                   "--zone=us-east5-a", "--project=my-proj", "--worker=all"]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhf", "--zone=us-east5-a", "--project=my-proj"]
    assert ssh[8] == "--worker=all"
    remote = _remote(ssh)
    assert 'python3 -m pip install -e "$HOME/rlhf_jax[tpu]"' in remote
    assert "gcsfuse --implicit-dirs my-bucket /mnt/disks/my-bucket" in remote


def test_setup_can_clone_instead(capsys):
    (ssh,) = dry_run(capsys, "setup", "--git-url", "https://example.com/rlhf_jax.git", "--ref", "v1")
    remote = _remote(ssh)
    assert "git clone https://example.com/rlhf_jax.git $HOME/rlhf_jax" in remote
    assert "fetch --depth=1 origin v1" in remote and remote.endswith('pip install -e "$HOME/rlhf_jax[tpu]"')


def _launched(remote: str) -> list[str]:
    """The rlhf-jax arguments inside the remote shell line."""
    words = shlex.split(remote)
    start = words.index("rlhf-jax") + 1
    return words[start:words.index(">", start)]


@pytest.mark.parametrize("stage", [s for s in cli.STAGES if s not in ("sample", "label")])
def test_launch_runs_the_stage_on_every_worker_and_the_cli_accepts_it(capsys, stage):
    experiment = "experiments/llama_tpu_pod.py"
    check, ssh = dry_run(capsys, "launch", "--topology", "v5p-32", "--env", "RLHF_JAX_DATA_DIR=/mnt/disks/b/data",
                         "--", stage, "--config", experiment, "--workdir", "/mnt/disks/b/runs/my run",
                         "--ppo.kl_coef=0.05", "--sft.optim.learning_rate=2e-5")
    # first, here: every program of the stage compiled for the slice (a non-zero exit stops the launch)
    assert check[check.index("-m"):] == ["-m", "rlhf_jax.cli", "compile", "--config", str(REPO / experiment),
                                         "--topology", "v5p-32", "--stages", tpu.COMPILED_STAGES[stage],
                                         "--ppo.kl_coef=0.05", "--sft.optim.learning_rate=2e-5"]
    assert "--worker=all" in ssh
    remote = _remote(ssh)
    assert "export RLHF_JAX_DATA_DIR=/mnt/disks/b/data" in remote
    assert f"> $HOME/rlhf_jax_runs/{stage}.log" in remote and f"echo $! > $HOME/rlhf_jax_runs/{stage}.pid" in remote
    launched = _launched(remote)
    assert launched[-1] == "--distributed.mode=auto"
    # what each worker's rlhf-jax will make of it, with the real parser and overrides
    parsed, overrides = cli._parser().parse_known_args(launched)
    assert (parsed.command, parsed.config, parsed.workdir) == (stage, experiment, "/mnt/disks/b/runs/my run")
    cfg = apply_overrides(load_experiment(REPO / experiment), overrides)
    assert cfg.ppo.kl_coef == 0.05 and cfg.sft.optim.learning_rate == 2e-5
    assert cfg.distributed.mode == "auto"


@pytest.mark.parametrize("args, message", [
    (["train", "--workdir", "w"], "would refuse train"),
    (["sft", "--workdir", "w", "--sft.optim.learnig_rate=1"], "would refuse the overrides"),
    (["sft", "--workdir", "w", "--sft.optim.learning_rate=fast"], "would refuse the overrides"),
    (["sft", "--config", "experiments/tiny_cpu.py"], "pass --workdir"),
    (["sample", "--workdir", "w"], "one worker"),
    (["label", "--workdir", "w"], "one worker"),
    ([], "after --"),
    (["sft", "--workdir", "w", "--config", "experiments/nowhere.py"], "nowhere.py is not here to compile"),
])
def test_launch_refuses_what_rlhf_jax_would_refuse(capsys, args, message):
    assert tpu.main(["launch", *WHERE, "--dry-run", "--topology", "v5p-32", "--", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing to run
    assert message in captured.err


def test_launch_needs_a_topology_to_compile_for_or_an_explicit_skip(capsys):
    assert tpu.main(["launch", *WHERE, "--dry-run", "--", "sft", "--workdir", "w"]) == 2
    assert "pass --topology" in capsys.readouterr().err
    assert tpu.main(["launch", *WHERE, "--dry-run", "--topology", "v5p-31", "--", "sft", "--workdir", "w"]) == 2
    assert "v5p-31" in capsys.readouterr().err


def test_a_failing_compile_check_stops_the_launch(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(tpu.subprocess, "run", lambda command: ran.append(command) or
                        type("Result", (), {"returncode": 3 if "compile" in command else 0})())
    assert tpu.main(["launch", *WHERE, "--topology", "v5e-16", "--", "sft", "--workdir", "/w"]) == 3
    assert len(ran) == 1 and "compile" in ran[0]  # the ssh launch never ran


def test_launch_keeps_an_explicit_distributed_mode(capsys):
    (ssh,) = dry_run(capsys, "launch", "--skip-compile-check", "--run", "x", "--", "rm", "--workdir", "/w",
                     "--distributed.mode=on")
    launched = _launched(_remote(ssh))
    assert launched == ["rm", "--workdir", "/w", "--distributed.mode=on"]
    assert "$HOME/rlhf_jax_runs/x.log" in _remote(ssh)


def test_logs_stop_status_delete(capsys):
    assert _remote(dry_run(capsys, "logs", "--run", "sft")[0]) == "tail -n 200 -F $HOME/rlhf_jax_runs/sft.log"
    (ssh,) = dry_run(capsys, "logs", "--run", "sft", "--worker", "all", "--no-follow", "--lines", "50")
    assert "--worker=all" in ssh and _remote(ssh) == "tail -n 50 $HOME/rlhf_jax_runs/sft.log"
    (ssh,) = dry_run(capsys, "stop", "--run", "sft")
    assert "--worker=all" in ssh and _remote(ssh) == "kill -TERM $(cat $HOME/rlhf_jax_runs/sft.pid)"
    assert _remote(dry_run(capsys, "stop", "--run", "sft", "--kill")[0]).startswith("kill -KILL")
    assert dry_run(capsys, "status") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "rlhf", "--zone=us-east5-a", "--project=my-proj"]]
    assert dry_run(capsys, "delete") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rlhf", "--zone=us-east5-a", "--project=my-proj", "--quiet"]]
    assert dry_run(capsys, "delete", "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "rlhf-qr", "--zone=us-east5-a",
         "--project=my-proj", "--force", "--quiet"]]


def test_every_subcommand_has_a_dry_run():
    subparsers = next(a for a in tpu.parser()._actions if a.dest == "subcommand").choices
    assert set(subparsers) == {"create", "setup", "launch", "logs", "stop", "status", "delete"}
    for name, sub in subparsers.items():
        assert any("--dry-run" in a.option_strings for a in sub._actions), name


def test_without_dry_run_it_runs_what_it_prints_and_stops_at_a_failure(capsys, monkeypatch):
    ran = []

    class Done:
        def __init__(self, rc):
            self.returncode = rc

    monkeypatch.setattr(tpu.subprocess, "run", lambda command: ran.append(command) or Done(0))
    assert tpu.main(["setup", *WHERE]) == 0
    assert [shlex.join(c) for c in ran] == capsys.readouterr().out.splitlines()
    assert len(ran) == 3
    ran.clear()
    monkeypatch.setattr(tpu.subprocess, "run", lambda command: ran.append(command) or Done(7))
    assert tpu.main(["setup", *WHERE]) == 7 and len(ran) == 1  # the archive failed: nothing copied


def test_every_launchable_command_has_programs_rlhf_jax_compile_knows():
    """`launch` compiles each command's programs first: every command but sample and label
    (one worker each) names stages `rlhf-jax compile --stages` accepts."""
    from rlhf_jax.aot.command import stages_of

    for command in cli.STAGES:
        if command not in ("sample", "label"):
            assert stages_of(tpu.COMPILED_STAGES[command])
