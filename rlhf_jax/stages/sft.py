"""Stage 1: supervised fine-tuning on demonstrations (and base-LM pretraining on text).

The loop only wires things together: data from ``rlhf_jax.data``, the jitted step from
``rlhf_jax.steps``, checkpoints from ``rlhf_jax.checkpoint``. Rerunning the same command
resumes from the last checkpoint; the final params are exported for the next stage.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from rlhf_jax import provenance, steps
from rlhf_jax.config import Config, ModelConfig, SFTConfig
from rlhf_jax.data import SFTBatches, TextBatches
from rlhf_jax.evaluation import mean_lm_loss
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.models import LanguageModel
from rlhf_jax.optim import learning_rate_schedule, make_optimizer
from rlhf_jax.stages import common
from rlhf_jax.stages.loop import train_loop


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
    state, state_shardings = steps.create_train_state(model, tx, env.mesh, jax.random.PRNGKey(cfg.seed),
                                                      init_params)
    ckpts, state, start = common.restore_or_start(env, stage_cfg.checkpoint, state)
    common.write_run_config(env)

    # unpacked rows are one example then padding: a GPU may take cuDNN's fused attention
    right_padded = not stage_cfg.data.packing
    step_fn = steps.make_sft_step(model, tx, env.mesh, state_shardings, stage_cfg.optim.grad_accum_steps,
                                  learning_rate_schedule(stage_cfg.optim, total_steps),
                                  right_padded=right_padded)
    evaluate = None
    if val is not None:  # its data config is the training one's, unshuffled: the same layout
        eval_fn = steps.make_lm_eval_step(model, env.mesh, state_shardings.params, right_padded)
        evaluate = lambda s: {"val/loss": mean_lm_loss(eval_fn, s.params, val, env.mesh)}  # noqa: E731
    logger = MetricsLogger(env.stage_dir, start, total_steps, stage, show_progress)
    if start == 0 and getattr(train, "num_truncated", 0):
        logger.log(0, {"data/truncated_examples": train.num_truncated})
    if start == 0:
        logger.log(0, common.trainable_summary(state.params, state.opt_state))
    state, finished = train_loop(
        env, state=state, step_fn=lambda state, batch, step: step_fn(state, batch), batches=train, total_steps=total_steps, ckpts=ckpts,
        start_step=start, log_every=stage_cfg.log_every, eval_every=stage_cfg.eval_every,
        evaluate=evaluate, save_every=stage_cfg.checkpoint.save_every, logger=logger,
        progress={"loss": "train/loss"}, stop_after=stop_after)
    logger.close()
    ckpts.close()
    if not finished:
        return None
    common.export_adapter(env, state.params, stage_cfg.init_from or cfg.model.hf_path)
    return provenance.export(env, state.params, {"stage": stage, "steps": total_steps})
