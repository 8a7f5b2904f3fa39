"""One TrainState for every model: params, optimizer state, EMA params, BatchNorm stats, step, rng."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off (ema_decay == 0)
  batch_stats: Any  # {} for models without BatchNorm
  rng: jax.Array  # base key; steps use fold_in(rng, step), so resuming replays the same noise
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  ema_decay: float = struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx, rng, ema_decay: float, batch_stats=None) -> "TrainState":
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if ema_decay > 0 else None,
        batch_stats=batch_stats if batch_stats is not None else {},
        rng=rng,
        tx=tx,
        ema_decay=ema_decay,
    )

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)

  def apply_gradients(self, grads, **changes) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if ema is not None:
      # Warm-up (as TF's ExponentialMovingAverage with num_updates): early on the average
      # follows the params closely, so short runs do not sample from near-initial weights.
      decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
      ema = optax.incremental_update(params, ema, step_size=1.0 - decay)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema, **changes)

  @property
  def eval_params(self):
    """EMA weights when kept (what sampling and evaluation use), else the raw params."""
    return self.ema_params if self.ema_params is not None else self.params
