"""DDPM forward process (Ho et al. 2020): noise schedule, its closed forms, training loss.

The schedule is a pytree of float32 tables indexed by timestep; it can be passed into
or closed over by jitted code. Lookups use plain integer indexing, which works with a
batch-sharded `t` under a mesh with Auto axes (the mesh `infra/parallel.py` builds).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


# What the denoiser outputs: the noise (paper), the clean sample (ablation), or the velocity
# v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), which stays well scaled at every t.
PREDICTIONS = ("eps", "x0", "v")
# Per-timestep loss weights: uniform (the simple DDPM objective) or min-SNR-gamma (Hang et al.
# 2023), which caps the weight of the low-noise steps so training spends its effort where
# the samples' structure is decided.
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


@flax.struct.dataclass
class Schedule:
  """Per-timestep tables, each [T] float32 (computed in float64, then cast)."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array  # abar_{t-1}, with abar_{-1} = 1
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
  posterior_log_variance_clipped: jax.Array  # log beta~_t with beta~_0 := beta~_1 (beta~_0 = 0)
  posterior_mean_coef1: jax.Array  # weight of x0 in the posterior mean
  posterior_mean_coef2: jax.Array  # weight of x_t in the posterior mean

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 2e-2) -> Schedule:
  """Linear betas from beta_start to beta_end over num_timesteps steps (the paper's schedule)."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"betas need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
                     f"beta_end={beta_end}")
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  tables = dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
  )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] for timesteps t [B], shaped [B, 1, ..., 1] to broadcast against a rank-`ndim` batch."""
  return table[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
  return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0_from_eps(sched: Schedule, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Invert q_sample: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  return (extract(sched.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
          - extract(sched.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_x0(sched: Schedule, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """Invert q_sample for the noise: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
  return ((extract(sched.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
          / extract(sched.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def predict_x0_from_v(sched: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
  return (extract(sched.sqrt_alphas_cumprod, t, xt.ndim) * xt
          - extract(sched.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)


def predict_x0(sched: Schedule, out: jax.Array, xt: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
  """The clean sample a denoiser's output implies, whatever it predicts."""
  if prediction == "eps":
    return predict_x0_from_eps(sched, xt, t, out)
  if prediction == "v":
    return predict_x0_from_v(sched, xt, t, out)
  return out


def regression_target(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
  """What the denoiser regresses for (x0, noise) at t."""
  if prediction == "eps":
    return noise
  if prediction == "v":
    return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)
  return x0


def loss_weights(sched: Schedule, t: jax.Array, prediction: str, weighting: str, gamma: float) -> jax.Array:
  """Per-example weights [B] of the MSE; min-SNR-gamma caps the x0-error weight at gamma.

  In x0 terms the weight is min(SNR, gamma); an eps error is SNR times an x0 error and a v
  error SNR + 1 times, hence the divisions (Hang et al. 2023, eq. 8 and appendix).
  """
  if weighting == "uniform":
    return jnp.ones(t.shape, jnp.float32)
  abar = sched.alphas_cumprod[t]
  snr = abar / (1.0 - abar)
  capped = jnp.minimum(snr, gamma)
  if prediction == "eps":
    return capped / snr
  if prediction == "v":
    return capped / (snr + 1.0)
  return capped


def posterior_mean_variance(sched: Schedule, x0: jax.Array, xt: jax.Array,
                            t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_{t-1} | x_t, x0): (mean [B,...], variance [B,1..], clipped log-variance [B,1..])."""
  mean = (extract(sched.posterior_mean_coef1, t, xt.ndim) * x0
          + extract(sched.posterior_mean_coef2, t, xt.ndim) * xt)
  return (mean, extract(sched.posterior_variance, t, xt.ndim),
          extract(sched.posterior_log_variance_clipped, t, xt.ndim))


def diffusion_loss(apply_fn: Callable[..., jax.Array], params: Any, sched: Schedule, x0: jax.Array,
                   rng: jax.Array, *, prediction: str = "eps", train: bool = True,
                   cond: jax.Array | None = None, weighting: str = "uniform", min_snr_gamma: float = 5.0,
                   self_condition: bool = False, pixel_weights: jax.Array | None = None,
                   **model_kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DDPM objective: MSE between the denoiser's output and its target, weighted per timestep.

  Args:
    apply_fn: `apply_fn(params, x_t, t, *, train, rngs, cond, **model_kwargs) -> prediction`,
      e.g. `UNet.apply` with `params` the variables dict; `rngs` is {"dropout": key}, `t` is
      int32 [B]; with `self_condition` it also takes `self_cond` (an x0 estimate, x_t's shape).
    params: the denoiser's variables.
    sched: the noise schedule.
    x0: clean batch [B, ...] in [-1, 1].
    rng: key for timesteps, noise, dropout and the self-conditioning coin.
    prediction: "eps" regresses the noise, "x0" the clean sample, "v" the velocity.
    train: passed to apply_fn (enables dropout).
    cond: optional conditioning passed to apply_fn (the SR model's low-resolution pair).
    weighting: "uniform" (mean over all dims, the simple objective) or "min_snr".
    min_snr_gamma: gamma of "min_snr".
    self_condition: Analog Bits' self-conditioning (Chen et al. 2022): on half of the steps
      (one coin per batch) the model first estimates x0 without help, and that estimate,
      without gradient, is its self_cond input for the trained pass; otherwise self_cond is 0.
      Sampling feeds each step the previous step's x0 estimate.
    pixel_weights: optional [B, H, W] weights of each pixel's squared error (e.g. by its class, so rare
      classes are not drowned by the common ones); None weighs every pixel alike.
    **model_kwargs: further inputs passed to apply_fn unchanged (e.g. G's class presence).

  Returns:
    (loss, aux): aux["loss_per_channel"] is the weighted MSE per channel [C] (its mean is the
    loss), so a caller can log the image and label channels of a joint sample separately.
  """
  check_prediction(prediction)
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
  t_key, noise_key, dropout_key = jax.random.split(rng, 3)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  xt = q_sample(sched, x0, t, noise)
  kwargs = dict(train=train, rngs={"dropout": dropout_key}, cond=cond, **model_kwargs)
  if self_condition:
    def estimate(_):
      first = apply_fn(params, xt, t, self_cond=jnp.zeros_like(xt), **kwargs)
      return jax.lax.stop_gradient(jnp.clip(predict_x0(sched, first.astype(jnp.float32), xt, t, prediction), -1, 1))

    use = jax.random.bernoulli(jax.random.fold_in(rng, 3))
    kwargs["self_cond"] = jax.lax.cond(use, estimate, jnp.zeros_like, xt)
  out = apply_fn(params, xt, t, **kwargs)
  target = regression_target(sched, x0, t, noise, prediction)
  weights = loss_weights(sched, t, prediction, weighting, min_snr_gamma)
  squared = jnp.square(out.astype(jnp.float32) - target) * weights.reshape((-1,) + (1,) * (x0.ndim - 1))
  if pixel_weights is not None:
    squared = squared * pixel_weights[..., None]
  loss_per_channel = jnp.mean(squared, axis=tuple(range(x0.ndim - 1)))
  return jnp.mean(loss_per_channel), {"loss_per_channel": loss_per_channel}
