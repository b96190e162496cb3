"""rlhf_jax: the InstructGPT pipeline as pure, jitted, mesh-sharded JAX train steps."""

__version__ = "0.1.0"
