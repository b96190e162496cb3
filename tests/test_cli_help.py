"""What a new user's first commands print: every command in ``--help``, no transformers advice."""

import os
import subprocess
import sys

import pytest

from rlhf_jax.cli import main


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for command in ("pipeline", "pretrain", "sft", "comparisons", "rm", "ppo", "rloo", "grpo", "dpo", "best-of-n",
                    "evaluate", "sample", "label", "convert"):
        assert command in usage, command


def test_importing_the_library_prints_no_transformers_advice():
    """Without torch, transformers advises on import that its models are unavailable; the
    library never uses them. Simulated by hiding torch from the child process."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    code = ("import sys; sys.modules['torch'] = None\n"  # import torch now fails, as without it
            "import rlhf_jax.tasks, rlhf_jax.data.tokenizer, transformers\n"
            "from transformers.utils import is_torch_available\n"
            "print('torch available:', is_torch_available())")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr + proc.stdout
