"""Optimizer and learning-rate schedule from a `train` config section."""

from __future__ import annotations

import functools

import jax
import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "poly", "cosine")


def learning_rate_schedule(t) -> optax.Schedule:
  """Linear warmup to t.lr, then constant (DDPM), polynomial decay (segmentation) or cosine."""
  return _make(*_settings(t))[1]


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) of train section `t`.

  Equal settings return the same objects: the optimizer is a static part of every TrainState, so
  runs that share it (an experiment's seeds and arms) have equal states and reuse one traced step.
  """
  return _make(*_settings(t))


def _settings(t) -> tuple:
  return (t.optimizer, float(t.lr), t.schedule, int(t.num_steps), int(t.warmup_steps),
          float(t.get("poly_power", 0.9)), float(t.get("weight_decay", 0.0)), float(t.grad_clip))


@functools.lru_cache(maxsize=32)
def _make(optimizer, lr, schedule, num_steps, warmup_steps, poly_power, weight_decay, grad_clip):
  decay_steps = max(1, num_steps - warmup_steps)
  if schedule == "constant":
    after = optax.constant_schedule(lr)
  elif schedule == "poly":
    after = optax.polynomial_schedule(lr, 0.0, power=poly_power, transition_steps=decay_steps)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    raise ValueError(f"train.schedule={schedule!r}: must be one of {SCHEDULES}")
  if warmup_steps > 0:
    after = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])
  if optimizer == "adam":
    opt = optax.adam(after)
  elif optimizer == "adamw":
    # Decay kernels only: decaying BatchNorm/GroupNorm scales and biases hurts and is unusual.
    opt = optax.adamw(after, weight_decay=weight_decay, mask=_kernels)
  else:
    raise ValueError(f"train.optimizer={optimizer!r}: must be one of {OPTIMIZERS}")
  if grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  return opt, after


def _kernels(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)
