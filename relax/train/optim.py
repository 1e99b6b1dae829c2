"""The optimizer of SFT and GRPO: AdamW after global-norm clipping, on a learning-rate schedule.

``make_optimizer(cfg, total_steps)`` turns an ``OptimConfig`` into the optax
transformation both training loops apply: a linear warm-up over ``warmup_ratio`` of
the steps, then a constant, cosine or linear decay (``lr_schedule``); weight decay on
matrices only, as Hugging Face trainers do. Where its state lives on the mesh is
``relax.train.sharding``'s concern, how a step applies it ``relax.train.update``'s.
"""

import jax
import optax


def lr_schedule(cfg, total_steps):
    """Linear warm-up from 0 over ``warmup_ratio * total_steps``, then the decay."""
    total_steps = max(int(total_steps), 1)
    warmup = round(cfg.warmup_ratio * total_steps)
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    rest = max(total_steps - warmup, 1)
    if cfg.decay == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, rest)
    else:
        raise ValueError(f"optim.decay must be constant, cosine or linear, not {cfg.decay!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg, total_steps):
    """AdamW (decay on matrices only, as HF trainers do) after global-norm clipping."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        )
    )
    return optax.chain(*parts)
