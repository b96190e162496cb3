"""Our LoRA adapters as a PEFT adapter directory, which ``peft`` loads onto the
``transformers`` model of the base weights:

- ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``,
  ``base_model_name_or_path``, ...;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
  ``...lora_B.weight`` ``[out, r]`` per adapted module, e.g.
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

Where each module lives in the HF model comes from the one table ``models.hf.param_sources``
(the module of a kernel's tensor). A fused HF module (GPT-2's ``c_attn`` holds query, key and
value) gets one adapter of rank ``n * r`` that computes exactly our ``n`` separate ones:
``lora_A`` stacks their ``A``s, ``lora_B`` places each ``B`` in its block of outputs
(zeros elsewhere), and ``rank_pattern`` / ``alpha_pattern`` keep the scaling ``alpha / r``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from rlhf_jax.config import ModelConfig
from rlhf_jax.models import lora
from rlhf_jax.models.hf import param_sources, to_host
from rlhf_jax.models.hf_config import HFError
from rlhf_jax.models.stacking import unstack_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the transformers model as base_model.model


@dataclasses.dataclass
class _Module:
    """One HF module's adapter, gathered from our (one or several fused) adapters."""

    parts: int  # equal output blocks of the HF module (3 for GPT-2's c_attn, else 1)
    blocks: dict[int, tuple[np.ndarray, np.ndarray]]  # part -> (A [r, in], B [out_block, r])

    def tensors(self) -> tuple[np.ndarray, np.ndarray]:
        """(lora_A ``[n r, in]``, lora_B ``[parts * out_block, n r]``) for the n parts present."""
        order = sorted(self.blocks)
        a = np.concatenate([self.blocks[p][0] for p in order], axis=0)
        if self.parts == 1:
            return a, self.blocks[order[0]][1]
        rank, out_block = self.blocks[order[0]][0].shape[0], self.blocks[order[0]][1].shape[0]
        b = np.zeros((self.parts * out_block, rank * len(order)), a.dtype)
        for j, part in enumerate(order):
            b[part * out_block:(part + 1) * out_block, j * rank:(j + 1) * rank] = self.blocks[part][1]
        return a, b


def _modules(params: Any, cfg: ModelConfig) -> dict[str, _Module]:
    """HF module name (``model.layers.0.self_attn.q_proj``) -> its adapter."""
    adapters = jax.tree.map(to_host, lora.adapter_params(params))
    if cfg.stacked:
        adapters = unstack_layers(adapters, cfg.n_layers)
    table = param_sources(cfg)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    modules: dict[str, _Module] = {}
    for path in sorted(p for p in flat if p.endswith("/lora_a")):
        ours = path[: -len("/lora_a")]
        src = table.get(f"{ours}/kernel")
        if src is None:
            raise HFError(f"{ours}: an adapted module with no place in a HF {cfg.family} model")
        a, b = flat[path], flat[f"{ours}/lora_b"]
        rank = a.shape[-1]
        module = modules.setdefault(src.name.removesuffix(".weight"), _Module(src.parts, {}))
        module.blocks[src.part] = (a.reshape(-1, rank).T, b.reshape(rank, -1).T)
    return modules


def _short_names(modules: list[str]) -> dict[str, str]:
    """Each module's name in ``target_modules``: its last component (``q_proj``), or its last
    two (``attn.c_proj``) where the last alone would also match another kind of module."""
    kinds = {".".join(m.split(".")[-2:]) for m in modules}
    last = [k.split(".")[-1] for k in kinds]
    return {m: (m.split(".")[-1] if last.count(m.split(".")[-1]) == 1 else ".".join(m.split(".")[-2:]))
            for m in modules}


def peft_adapter(params: Any, cfg: ModelConfig, base_model_name_or_path: str) -> tuple[dict[str, Any],
                                                                                       dict[str, np.ndarray]]:
    """(``adapter_config.json`` contents, tensors by PEFT key) for the adapters in ``params``
    of a :class:`~rlhf_jax.models.LanguageModel` of ``cfg`` (whose ``lora`` made them)."""
    if not cfg.lora.enabled or not lora.has_adapters(params):
        raise HFError("a PEFT adapter needs a model with LoRA adapters (model.lora.rank > 0)")
    modules = _modules(params, cfg)
    names = _short_names(sorted(modules))
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for module, adapter in modules.items():
        a, b = adapter.tensors()
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
        n = len(adapter.blocks)
        if n > 1:  # a fused module: rank n * r, alpha n * alpha, so alpha / rank stays ours
            rank_pattern[names[module]] = n * cfg.lora.rank
            alpha_pattern[names[module]] = n * cfg.lora.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted(set(names.values())), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": cfg.family == "gpt2",  # GPT-2's Conv1D weights are [in, out]
        "init_lora_weights": True, "use_rslora": False, "modules_to_save": None, "inference_mode": True,
    }
    return config, tensors


def export_peft(params: Any, cfg: ModelConfig, directory: str | pathlib.Path,
                base_model_name_or_path: str) -> pathlib.Path:
    """Writes the PEFT adapter directory of ``params``' adapters (every process gathers,
    process 0 writes). ``base_model_name_or_path``: the HF model the adapters go on."""
    config, tensors = peft_adapter(params, cfg, base_model_name_or_path)
    directory = pathlib.Path(directory)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return directory
