"""``model.lora``: low-rank adapters (Hu et al. 2021, arXiv 2106.09685) on the block's
projections, and the names a user may target them by (ours, or PEFT's / Hugging Face's).

A targeted projection ``y = x W`` becomes ``y = x W + (alpha / rank) * dropout(x) A B`` with
``A`` ``[in, rank]`` drawn as PEFT draws it and ``B`` ``[rank, out]`` zero, so a fresh
adapter leaves the model exactly as it was. With adapters on, only they (and a reward or
value model's scalar head) train; see docs/lora.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_jax.config.checks import ConfigError, check_dropout

# Our projection modules (the ``name`` of each ``models.transformer.dense`` in a block) per family.
PROJECTIONS = {
    "llama": ("query", "key", "value", "out", "gate", "up", "fc_out"),
    "gpt2": ("query", "key", "value", "out", "fc_in", "fc_out"),
}
# PEFT / transformers module names -> ours. PEFT matches a name against the end of a module's
# dotted path, so GPT-2's bare ``c_proj`` is both the attention's and the MLP's output.
HF_NAMES = {
    "llama": {"q_proj": ("query",), "k_proj": ("key",), "v_proj": ("value",), "o_proj": ("out",),
              "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("fc_out",)},
    "gpt2": {"c_attn": ("query", "key", "value"), "attn.c_proj": ("out",), "mlp.c_fc": ("fc_in",),
             "c_fc": ("fc_in",), "mlp.c_proj": ("fc_out",), "c_proj": ("out", "fc_out")},
}
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head


@dataclass(frozen=True)
class LoRAConfig:
    """Adapters on the projections ``target_modules`` names; ``rank`` 0 turns them off
    (every weight trains, as without this block).

    ``target_modules``: our names (``query, key, value, out, gate, up, fc_in, fc_out``), the
    PEFT / HF names of the family (Llama: ``q_proj k_proj v_proj o_proj gate_proj up_proj
    down_proj``; GPT-2: ``c_attn`` (= query, key, value), ``c_fc``, ``attn.c_proj``,
    ``mlp.c_proj``, ``c_proj`` (both)), or ``all-linear``.
    """

    rank: int = 0
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input, while a stage trains with dropout on (SFT, RM)
    target_modules: tuple[str, ...] = (ALL_LINEAR,)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def targets(self, family: str) -> frozenset[str]:
        """Our module names the adapters go on, for a model of ``family``."""
        return resolve_targets(self.target_modules, family, "model.lora.target_modules")

    def validate(self, family: str, where: str = "model.lora") -> None:
        if self.rank < 0:
            raise ConfigError(f"{where}.rank must be >= 0 (0: no adapters), got {self.rank}")
        if not self.enabled:
            return
        if not self.alpha > 0:
            raise ConfigError(f"{where}.alpha must be positive, got {self.alpha}")
        check_dropout(self.dropout, f"{where}.dropout")
        resolve_targets(self.target_modules, family, f"{where}.target_modules")


def resolve_targets(names: tuple[str, ...], family: str, field: str) -> frozenset[str]:
    """Our projection names for ``names`` (ours, PEFT's or ``all-linear``) in ``family``;
    an unknown name is an error naming ``field`` and what is accepted."""
    ours, hf = PROJECTIONS[family], HF_NAMES[family]
    if not names:
        raise ConfigError(f"{field} is empty: name at least one projection (or {ALL_LINEAR!r})")
    out: set[str] = set()
    for name in names:
        if name == ALL_LINEAR:
            out.update(ours)
        elif name in ours:
            out.add(name)
        elif name in hf:
            out.update(hf[name])
        else:
            raise ConfigError(f"{field}: {name!r} is not a projection of a {family} model; accepted: "
                              f"{[*ours, *hf, ALL_LINEAR]}")
    return frozenset(out)
