"""rlhf_jax: the InstructGPT pipeline as pure, jit-compiled, mesh-sharded JAX train steps."""

import os as _os

# The library uses transformers for tokenizers and configs only, never its models, so the
# "PyTorch was not found. Models won't be available" advice printed on every command says
# nothing to our users; it is an advisory warning, which this variable silences (set it to
# 0 to see transformers' advice again).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
