"""The embedded default (what `rlhf-jax pipeline` runs with no --config): a 2-layer
Llama-style model on the embedded synthetic instruction task, for a 2-core CPU."""

from rlhf_jax.config import Config
from rlhf_jax.default_config import default_config


def get_config() -> Config:
    return default_config()
