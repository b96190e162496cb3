"""Optimisers from config: AdamW (paper: b1=0.9, b2=0.95) with a cosine decay to a fraction
of peak, optional linear warm-up, and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from rlhf_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` then cosine decay to ``final_lr_fraction`` of it."""
    total_steps = max(total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else cfg.learning_rate,
        peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps, decay_steps=total_steps,
        end_value=cfg.learning_rate * cfg.final_lr_fraction)


def _decay_mask(params):
    # Weight decay on matrices only: biases, norm scales and the scalar head's bias are exempt.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                        eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
