"""Reverse process: ancestral DDPM and DDIM samplers, each one `lax.scan` over timesteps.

The samplers are pure functions of a denoiser `denoise_fn(x_t, t) -> output` (t: int32
[B]); jit the whole call once and every step runs inside that one program:

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def generate(params, rng):
    denoise = make_denoise_fn(model.apply, params)
    return sample_ddim(denoise, sched, shape, rng, num_steps=50, sharding=batch_sharding)

`sharding` (optional) pins the batch layout of x_t at every step, so a batch sharded
over the mesh's data axis stays sharded through the loop. Noise for step t comes from
fold_in(key, t), so DDIM with all T steps and eta=1 reproduces DDPM draw for draw.

With `self_condition` (Analog Bits) the denoiser is called as `denoise_fn(x_t, t, x0_prev)`:
each step sees the previous step's (clipped) x0 estimate, zeros at the first step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from satsynth_jax.diffusion.schedule import (Schedule, check_prediction, posterior_mean_variance,
                                             predict_eps_from_x0, predict_x0)

DenoiseFn = Callable[..., jax.Array]  # (x_t, t[, x0_prev]) -> output
SAMPLERS = ("ddpm", "ddim")  # sample.sampler: `sample` dispatches over them


def make_denoise_fn(apply_fn: Callable[..., jax.Array], params: Any, cond: jax.Array | None = None,
                    **model_kwargs) -> DenoiseFn:
  """Close over params and conditioning: (x_t, t) -> apply_fn(params, x_t, t, train=False, ...).

  `apply_fn` has the signature `diffusion_loss` documents (e.g. `UNet.apply`); `cond` is the
  SR model's low-resolution pair, or None for the unconditional generator; `model_kwargs` go
  to apply_fn unchanged. The returned function also takes `x0_prev`, passed as `self_cond`.
  """
  def denoise(x: jax.Array, t: jax.Array, x0_prev: jax.Array | None = None) -> jax.Array:
    extra = {} if x0_prev is None else {"self_cond": x0_prev}
    return apply_fn(params, x, t, train=False, rngs=None, cond=cond, **model_kwargs, **extra)
  return denoise


def _constrain(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _predict_x0(sched: Schedule, out: jax.Array, xt: jax.Array, t: jax.Array, prediction: str,
                clip_x0: bool) -> jax.Array:
  x0 = predict_x0(sched, out, xt, t, prediction)
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def _denoise(denoise_fn: DenoiseFn, x: jax.Array, t: jax.Array, x0_prev: jax.Array | None) -> jax.Array:
  return denoise_fn(x, t) if x0_prev is None else denoise_fn(x, t, x0_prev)


def sample_ddpm(denoise_fn: DenoiseFn, sched: Schedule, shape: tuple[int, ...], rng: jax.Array, *,
                prediction: str = "eps", clip_x0: bool = True, self_condition: bool = False,
                sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """Ancestral sampling over all T steps with the "fixed small" posterior variance (Ho et al.).

  Args:
    denoise_fn: (x_t [B,...], t int32 [B][, x0_prev]) -> eps, x0 or v prediction, x_t's shape.
    sched: the noise schedule the denoiser was trained with.
    shape: output shape [B, ...].
    rng: key for the initial noise and the per-step noise.
    prediction: what denoise_fn predicts, "eps", "x0" or "v".
    clip_x0: clip the predicted x0 to [-1, 1] before each step (data range).
    self_condition: pass each step the previous step's x0 estimate (zeros at the first).
    sharding: optional sharding of the batch, kept on x_t through the loop.

  Returns:
    Samples [B, ...] float32, clipped to [-1, 1].
  """
  check_prediction(prediction)
  init_key, step_key = jax.random.split(rng)
  x = _constrain(jax.random.normal(init_key, shape, jnp.float32), sharding)

  def step(carry, t):
    x, x0_prev = carry
    tb = jnp.full((shape[0],), t, jnp.int32)
    x0 = _predict_x0(sched, _denoise(denoise_fn, x, tb, x0_prev), x, tb, prediction, clip_x0)
    mean, _, log_variance = posterior_mean_variance(sched, x0, x, tb)
    noise = jax.random.normal(jax.random.fold_in(step_key, t), shape, jnp.float32)
    std = jnp.where(t > 0, jnp.exp(0.5 * log_variance), 0.0)  # the last step returns the mean
    return (_constrain(mean + std * noise, sharding), _self_cond(x0, self_condition)), None

  timesteps = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  (x, _), _ = jax.lax.scan(step, (x, _self_cond(jnp.zeros_like(x), self_condition)), timesteps)
  return jnp.clip(x, -1.0, 1.0)


def _self_cond(x0: jax.Array, self_condition: bool) -> jax.Array | None:
  """The x0 estimate the next step is given (clipped, whatever clip_x0 says), or None without self-conditioning."""
  return jnp.clip(x0, -1.0, 1.0) if self_condition else None


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Descending, evenly spaced timesteps for a num_steps DDIM run, starting at T-1.

  "Trailing" spacing (Lin et al. 2024): T-1, T-1-T/n, ..., T/n-1, so the first step starts
  from pure noise at t=T-1 as in training; with n=T it is every timestep.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"DDIM num_steps must be in [1, {num_timesteps}] (the schedule's T), "
                     f"got {num_steps}")
  return (np.arange(num_steps, 0, -1) * num_timesteps) // num_steps - 1


def sample_ddim(denoise_fn: DenoiseFn, sched: Schedule, shape: tuple[int, ...], rng: jax.Array, *,
                num_steps: int, eta: float = 0.0, prediction: str = "eps", clip_x0: bool = True,
                self_condition: bool = False, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """DDIM (Song et al. 2021) over `num_steps` of the T timesteps; eta=0 is deterministic.

  Args:
    denoise_fn, sched, shape, rng, prediction, clip_x0, self_condition, sharding: as for `sample_ddpm`.
    num_steps: number of denoiser calls, 1..T (timesteps from `ddim_timesteps`).
    eta: noise scale; 0 gives the deterministic ODE-like sampler, 1 the DDPM posterior
      variance (with num_steps=T it equals `sample_ddpm`).

  Returns:
    Samples [B, ...] float32, clipped to [-1, 1].
  """
  check_prediction(prediction)
  if eta < 0:
    raise ValueError(f"DDIM eta must be >= 0, got {eta}")
  timesteps = ddim_timesteps(sched.num_timesteps, num_steps)
  abar = sched.alphas_cumprod[timesteps]
  abar_prev = jnp.append(abar[1:], 1.0)  # the last step lands on x0 (abar = 1)
  init_key, step_key = jax.random.split(rng)
  x = _constrain(jax.random.normal(init_key, shape, jnp.float32), sharding)

  def step(carry, xs):
    x, x0_prev = carry
    t, a, a_prev = xs
    tb = jnp.full((shape[0],), t, jnp.int32)
    out = _denoise(denoise_fn, x, tb, x0_prev)
    x0 = _predict_x0(sched, out, x, tb, prediction, clip_x0)
    # Re-derive eps from the (clipped) x0 so that x_t = sqrt(a) x0 + sqrt(1 - a) eps holds.
    eps = out if prediction == "eps" and not clip_x0 else predict_eps_from_x0(sched, x, tb, x0)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0))
    noise = jax.random.normal(jax.random.fold_in(step_key, t), shape, jnp.float32)
    x = jnp.sqrt(a_prev) * x0 + direction * eps + sigma * noise
    return (_constrain(x, sharding), _self_cond(x0, self_condition)), None

  init = (x, _self_cond(jnp.zeros_like(x), self_condition))
  (x, _), _ = jax.lax.scan(step, init, (jnp.asarray(timesteps, jnp.int32), abar, abar_prev))
  return jnp.clip(x, -1.0, 1.0)


def sample(denoise_fn: DenoiseFn, sched: Schedule, shape: tuple[int, ...], rng: jax.Array, *, sampler: str,
           ddim_steps: int = 50, ddim_eta: float = 0.0, **options) -> jax.Array:
  """The one sampler dispatch: ancestral DDPM over all T steps, or DDIM over `ddim_steps` with noise `ddim_eta`;
  `options` (prediction, clip_x0, self_condition, sharding) go to the sampler as documented there."""
  if sampler == "ddpm":
    return sample_ddpm(denoise_fn, sched, shape, rng, **options)
  if sampler == "ddim":
    return sample_ddim(denoise_fn, sched, shape, rng, num_steps=ddim_steps, eta=ddim_eta, **options)
  raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
