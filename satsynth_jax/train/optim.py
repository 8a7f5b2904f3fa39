"""Optimizer and learning-rate schedule from a `train` config section."""

from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "poly", "cosine")


def learning_rate_schedule(t) -> optax.Schedule:
  """Linear warmup to t.lr, then constant (DDPM), polynomial decay (segmentation) or cosine."""
  decay_steps = max(1, t.num_steps - t.warmup_steps)
  if t.schedule == "constant":
    after = optax.constant_schedule(t.lr)
  elif t.schedule == "poly":
    after = optax.polynomial_schedule(t.lr, 0.0, power=t.get("poly_power", 0.9), transition_steps=decay_steps)
  elif t.schedule == "cosine":
    after = optax.cosine_decay_schedule(t.lr, decay_steps)
  else:
    raise ValueError(f"train.schedule={t.schedule!r}: must be one of {SCHEDULES}")
  if t.warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, t.lr, t.warmup_steps)
  return optax.join_schedules([warmup, after], [t.warmup_steps])


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(t)
  if t.optimizer == "adam":
    opt = optax.adam(schedule)
  elif t.optimizer == "adamw":
    # Decay kernels only: decaying BatchNorm/GroupNorm scales and biases hurts and is unusual.
    opt = optax.adamw(schedule, weight_decay=t.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
  else:
    raise ValueError(f"train.optimizer={t.optimizer!r}: must be one of {OPTIMIZERS}")
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt, schedule
