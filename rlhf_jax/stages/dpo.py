"""DPO on the collected comparisons (Rafailov et al. 2023), K-wise: every ordered pair of a
prompt's ranking (``dpo.kind="sigmoid"``, or ``"ipo"``), or the whole ranking's
Plackett-Luce likelihood (``"plackett_luce"``), on each response's log-ratio to the frozen
reference (the SFT export). The RM's offline preference step with the policy's summed
log-probs as the scores; no reward model, no sampling."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from rlhf_jax import parameters, provenance, steps
from rlhf_jax.config import Config
from rlhf_jax.data import RankingBatches
from rlhf_jax.models import LanguageModel, lora
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.offline import evaluate_preferences, train_offline
from rlhf_jax.stages.table import RunOptions


def reference_is_base(cfg: Config) -> bool:
    """LoRA without ``dpo.reference_init``: the reference is the policy's own base with the
    adapters off (no second copy)."""
    return cfg.model.lora.enabled and not cfg.dpo.reference_init


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """Trains the policy with DPO; returns its export (None if stopped early)."""
    d, stage = cfg.dpo, options.stage or "dpo"
    env = common.make_env(cfg, workdir, stage)
    if (finished := provenance.begin(env, "dpo", d)) is not None:
        return finished
    train = env.batches(RankingBatches, d.data.train_path, "dpo.data.train_path", d.data,
                        k_max=d.k_max).require_one_batch("dpo.data.batch_size")
    val = None
    if d.data.val_path:
        val = env.batches(RankingBatches, d.data.val_path, "dpo.data.val_path",
                          dataclasses.replace(d.data, shuffle=False), k_max=d.k_max)
    total_steps = d.max_steps or d.epochs * train.steps_per_epoch

    model = LanguageModel(cfg.model, dropout_rate=d.dropout)
    tx = make_optimizer(d.optim, total_steps)
    params, _ = env.load_params(d.policy_init, model, "dpo.policy_init")
    base_is_reference = reference_is_base(cfg)
    ref_params = None
    if not base_is_reference:
        ref_spec, ref_field = (d.reference_init, "dpo.reference_init") if d.reference_init else \
            (d.policy_init, "dpo.policy_init")
        ref_params, _ = env.load_params(ref_spec, LanguageModel(cfg.model), ref_field)

    built: dict[str, Any] = {}  # one jitted reference pass for the step and the evaluation: one compile

    def reference_of(param_shardings):
        """with_reference(policy params, batch) -> (batch, the frozen reference's log-probs):
        a forward pass, no gradient."""
        if "ref_logprobs" not in built:
            ref_shardings = (lora.base_params(param_shardings) if base_is_reference
                             else parameters.shardings_of(ref_params))
            built["ref_logprobs"] = steps.make_ranking_logprobs_fn(LanguageModel(cfg.model), env.mesh, ref_shardings)
        ref_logprobs = built["ref_logprobs"]
        return lambda params, batch: (batch, ref_logprobs(lora.base_params(params) if base_is_reference
                                                          else ref_params, batch))

    def make_step(state_shardings):
        step = steps.make_dpo_step(model, tx, env.mesh, state_shardings, beta=d.beta, kind=d.kind,
                                   label_smoothing=d.label_smoothing, grad_accum_steps=d.optim.grad_accum_steps,
                                   learning_rate=learning_rate_schedule(d.optim, total_steps))
        with_reference = reference_of(state_shardings.params)
        return lambda state, batch: step(state, with_reference(state.params, batch))

    def make_evaluate(state_shardings):
        eval_fn = steps.make_dpo_eval_step(model, env.mesh, state_shardings.params, beta=d.beta, kind=d.kind,
                                           label_smoothing=d.label_smoothing)
        with_reference = reference_of(state_shardings.params)
        return lambda s: evaluate_preferences(eval_fn, s.params, val, env.mesh, "dpo",
                                              lambda batch: with_reference(s.params, batch))

    trained = train_offline(env, d, model=model, tx=tx, params=params, total_steps=total_steps,
                            make_step=make_step, make_evaluate=make_evaluate if val is not None else None,
                            train=train, eval_every=d.eval_every or max(train.steps_per_epoch, 1),
                            truncated="data/truncated_responses", show_progress=options.show_progress,
                            stop_after=options.stop_after)
    if trained is None:
        return None
    state, _, logger = trained
    logger.close()
    common.export_adapter(env, state.params, d.policy_init)
    return provenance.export(env, state.params, {"stage": stage, "steps": total_steps, "kind": d.kind, "beta": d.beta})
