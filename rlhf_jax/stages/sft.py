"""Stage 1: supervised fine-tuning on demonstrations (and base-LM pretraining on text).

The loop only wires things together: data from ``rlhf_jax.data``, the jitted step from
``rlhf_jax.steps``, checkpoints from ``rlhf_jax.checkpoint``. Rerunning the same command
resumes from the last checkpoint; the final params are exported for the next stage.
"""

from __future__ import annotations

import dataclasses
import pathlib

from rlhf_jax import provenance, steps
from rlhf_jax.config import Config, ModelConfig, SFTConfig
from rlhf_jax.data import SFTBatches, TextBatches
from rlhf_jax.evaluation import mean_lm_loss
from rlhf_jax.models import LanguageModel
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.offline import train_offline
from rlhf_jax.stages.table import RunOptions


def run_sft(cfg: Config, workdir: str | pathlib.Path, *, stage: str = "sft",
            stage_cfg: SFTConfig | None = None, data_kind: str = "demonstrations",
            show_progress: bool = True, stop_after: int | None = None,
            model: ModelConfig | None = None) -> pathlib.Path | None:
    """Trains a language model with masked next-token loss; returns the export directory.

    ``data_kind='demonstrations'`` is SFT (loss on responses only); ``'text'`` is plain LM
    training on ``{"text"}`` records, which the pipeline uses to pretrain its base model
    (``stage='pretrain'``, ``stage_cfg=cfg.pretrain``). ``stop_after``: run at most that
    many steps now, checkpoint and return None (a rerun resumes). ``model``: train this
    architecture instead of ``cfg.model`` (the pipeline's larger reward-model base).
    """
    stage_cfg = stage_cfg or cfg.sft
    env = common.make_env(cfg, workdir, stage, model)
    cfg = env.cfg  # its model is the one this stage trains
    if (finished := provenance.begin(env, stage, stage_cfg)) is not None:
        return finished
    batches_cls = SFTBatches if data_kind == "demonstrations" else TextBatches
    data_field = f"{stage}.data"
    train = env.batches(batches_cls, stage_cfg.data.train_path, f"{data_field}.train_path",
                        stage_cfg.data).require_one_batch(f"{data_field}.batch_size")
    val = None
    if stage_cfg.data.val_path:
        val = env.batches(batches_cls, stage_cfg.data.val_path, f"{data_field}.val_path",
                          dataclasses.replace(stage_cfg.data, shuffle=False))
    total_steps = stage_cfg.max_steps or stage_cfg.epochs * train.steps_per_epoch

    model = LanguageModel(cfg.model, dropout_rate=stage_cfg.dropout)
    tx = make_optimizer(stage_cfg.optim, total_steps)
    init_params = env.initial_params(model, stage_cfg.init_from, f"{stage}.init_from")  # None: fresh
    # unpacked rows are one example then padding: a GPU may take cuDNN's fused attention
    right_padded = not stage_cfg.data.packing

    def make_step(state_shardings):
        return steps.make_sft_step(model, tx, env.mesh, state_shardings, stage_cfg.optim.grad_accum_steps,
                                   learning_rate_schedule(stage_cfg.optim, total_steps), right_padded=right_padded)

    def make_evaluate(state_shardings):  # its data config is the training one's, unshuffled: the same layout
        eval_fn = steps.make_lm_eval_step(model, env.mesh, state_shardings.params, right_padded)
        return lambda s: {"val/loss": mean_lm_loss(eval_fn, s.params, val, env.mesh)}

    trained = train_offline(env, stage_cfg, model=model, tx=tx, params=init_params, total_steps=total_steps,
                            make_step=make_step, make_evaluate=make_evaluate if val is not None else None,
                            train=train, eval_every=stage_cfg.eval_every, truncated="data/truncated_examples",
                            show_progress=show_progress, stop_after=stop_after)
    if trained is None:
        return None
    state, _, logger = trained
    logger.close()
    common.export_adapter(env, state.params, stage_cfg.init_from or cfg.model.hf_path)
    return provenance.export(env, state.params, {"stage": stage, "steps": total_steps})


def run(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """The stage table's SFT: demonstrations, ``cfg.sft``."""
    return run_sft(cfg, workdir, stage=options.stage or "sft", show_progress=options.show_progress,
                   stop_after=options.stop_after)


def run_pretrain(cfg: Config, workdir: str | pathlib.Path, options: RunOptions) -> pathlib.Path | None:
    """The stage table's pretraining: plain LM training on ``cfg.pretrain``'s texts."""
    return run_sft(cfg, workdir, stage=options.stage or "pretrain", stage_cfg=cfg.pretrain, data_kind="text",
                   show_progress=options.show_progress, stop_after=options.stop_after)
