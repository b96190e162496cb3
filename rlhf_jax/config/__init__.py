"""Typed, frozen run configuration.

An experiment is a Python file in ``experiments/`` whose ``get_config()`` returns a
:class:`Config`. The command line overrides any field by its dotted name
(``--sft.optim.learning_rate=3e-4``) through ``tyro``; the resolved config is written to
``<workdir>/config.json`` and read back with :func:`config_from_dict`, which rejects
unknown and ill-typed fields.

``model`` holds what a run runs on (architecture, mesh, multi-host, tokenizer), ``stages``
each stage's block, ``run`` the whole :class:`Config` and its files.
"""

from rlhf_jax.config.checks import ConfigError
from rlhf_jax.config.lora import LoRAConfig
from rlhf_jax.config.model import REMAT_POLICIES, DistributedConfig, MeshConfig, ModelConfig, TokenizerConfig
from rlhf_jax.config.run import (Config, apply_overrides, config_from_dict, load_config, load_experiment,
                                 save_config, to_dict)
from rlhf_jax.config.methods import (GOLD_REWARD, BestOfNConfig, DPOConfig, GRPOConfig, OnlineConfig, PPOConfig,
                                     RLOOConfig)
from rlhf_jax.config.stages import (CheckpointConfig, ComparisonsConfig, DataConfig, GenerationConfig, OptimConfig,
                                    PipelineConfig, RMConfig, SamplingConfig, SFTConfig)

__all__ = [
    "GOLD_REWARD", "REMAT_POLICIES", "BestOfNConfig", "CheckpointConfig", "ComparisonsConfig", "Config",
    "ConfigError", "DPOConfig", "DataConfig", "DistributedConfig", "GRPOConfig", "GenerationConfig", "LoRAConfig",
    "MeshConfig", "ModelConfig", "OnlineConfig", "OptimConfig", "PPOConfig", "PipelineConfig", "RLOOConfig",
    "RMConfig", "SFTConfig", "SamplingConfig", "TokenizerConfig", "apply_overrides", "config_from_dict", "load_config",
    "load_experiment", "save_config", "to_dict",
]
