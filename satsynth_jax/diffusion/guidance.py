"""Class-presence conditioning and classifier-free guidance (Ho & Salimans 2022) for G.

G can be told which of the K classes a pair should hold: a presence vector p in {0, 1}^K
(presence.py builds them from masks and sampling plans). The U-Net sees it as a code in
{-1, +1}^K; the "no condition" code is all zeros, which no real vector has, so one model
learns both the conditional and the unconditional distribution when training drops the
condition with probability `diffusion.condition_dropout`.

Guidance mixes the two predictions at scale w (0: the plain conditional prediction):
  out = (1 + w) out(x_t, c) - w out(x_t, no condition).
Every prediction target (eps, x0, v) is affine in the others at a given x_t, so mixing
outputs equals mixing noise estimates.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

CONDITIONS = ("none", "presence")  # diffusion.condition


def presence_code(presence: jax.Array, keep: jax.Array | None = None) -> jax.Array:
  """Presence [B, K] in {0, 1} -> the U-Net's code in {-1, +1}, rows with keep=False -> 0 (unconditional)."""
  code = 2.0 * presence.astype(jnp.float32) - 1.0
  return code if keep is None else jnp.where(keep[:, None], code, 0.0)


def keep_mask(rng: jax.Array, batch: int, dropout: float) -> jax.Array:
  """bool [B]: which rows keep their condition during training (each dropped with prob `dropout`)."""
  return jax.random.uniform(rng, (batch,)) >= dropout


def guided(out_conditional: jax.Array, out_unconditional: jax.Array, scale: float) -> jax.Array:
  """(1 + w) conditional - w unconditional."""
  return (1.0 + scale) * out_conditional - scale * out_unconditional


def guided_denoise_fn(denoise_with: Callable[..., jax.Array], code: jax.Array, scale: float):
  """(x_t, t[, x0_prev]) -> the guided output, from `denoise_with(code, x, t, x0_prev)`.

  Scale 0 calls the model once, conditioned; otherwise one call on the doubled batch
  (conditional rows, then unconditional ones), which keeps a single program per step.
  """

  def denoise(x, t, x0_prev=None):
    if scale == 0:
      return denoise_with(code, x, t, x0_prev)
    double = lambda a: None if a is None else jnp.concatenate([a, a])  # noqa: E731
    both = denoise_with(jnp.concatenate([code, jnp.zeros_like(code)]), double(x), double(t), double(x0_prev))
    conditional, unconditional = jnp.split(both, 2)
    return guided(conditional, unconditional, scale)

  return denoise
