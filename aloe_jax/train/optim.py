"""The optimizer: AdamW (optax) behind global-norm clipping, on a warmup + decay learning-rate schedule."""

from __future__ import annotations

import jax
import optax

from aloe_jax.train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over the warmup steps, then `cfg.schedule` decay to `lr·min_lr_ratio`."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    warmup = min(warmup, total_steps)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end)
    # After the warmup: linear decay or a constant. (optax.warmup_constant_schedule stays at 0 when warmup is 0.)
    after = (optax.linear_schedule(cfg.lr, end, max(total_steps - warmup, 1)) if cfg.schedule == "linear"
             else optax.constant_schedule(cfg.lr))
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params):
    """True for weight matrices, False for vectors (norm scales, biases): decaying those only hurts."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and the weight-decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
