"""DDPM schedule, loss and samplers against float64 references and analytic denoisers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from satsynth_jax.diffusion import sampling, schedule

T = 1000
SCHED = schedule.linear_schedule()


def _np_tables(num_timesteps=T, beta_start=1e-4, beta_end=2e-2):
  betas = np.linspace(beta_start, beta_end, num_timesteps)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  return betas, alphas, abar


def _bcast(v, ndim):
  return v.reshape((-1,) + (1,) * (ndim - 1))


def _mesh():
  return jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _x0_denoiser(sched, prediction, x0_fn):
  """Turn an x0 estimate x0_fn(x_t, abar_t) into the eps, x0 or v output a denoiser would give."""
  def denoise(x, t):
    abar = schedule.extract(sched.alphas_cumprod, t, x.ndim)
    x0 = x0_fn(x, abar)
    eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    return {"x0": x0, "eps": eps, "v": jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0}[prediction]
  return denoise


def _point_denoiser(sched, prediction, x_star):
  """Exact denoiser for a data set of one point x*: x0(x_t) = x*."""
  return _x0_denoiser(sched, prediction, lambda x, abar: jnp.broadcast_to(x_star, x.shape))


def _gaussian_denoiser(sched, prediction, mean, std):
  """Exact denoiser for data ~ N(mean, std^2) iid: E[x0 | x_t] by Gaussian conditioning."""
  def x0_fn(x, abar):
    gain = jnp.sqrt(abar) * std**2 / (abar * std**2 + 1.0 - abar)
    return mean + gain * (x - jnp.sqrt(abar) * mean)
  return _x0_denoiser(sched, prediction, x0_fn)


# ---- schedule ----


def test_linear_betas_endpoints_and_length():
  assert SCHED.num_timesteps == T
  assert SCHED.betas.shape == (T,) and SCHED.betas.dtype == jnp.float32
  np.testing.assert_allclose([SCHED.betas[0], SCHED.betas[-1]], [1e-4, 2e-2], rtol=1e-6)
  assert np.all(np.diff(np.asarray(SCHED.betas)) > 0)
  small = schedule.linear_schedule(10, 1e-3, 5e-2)
  np.testing.assert_allclose(small.betas, np.linspace(1e-3, 5e-2, 10), rtol=1e-6)
  with pytest.raises(ValueError, match="beta_end"):
    schedule.linear_schedule(10, 0.1, 0.01)


def test_q_sample_and_x0_eps_inversions_match_float64():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 10, 500, 998, 999], np.int32)
  _, _, abar = _np_tables()
  a = _bcast(abar[t], 4)
  want = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  x0, noise, t = jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)
  xt = schedule.q_sample(SCHED, x0, t, noise)
  np.testing.assert_allclose(xt, want, rtol=1e-5, atol=1e-6)
  # 1/sqrt(abar_999) ~ 160 amplifies the float32 rounding of x_t.
  np.testing.assert_allclose(schedule.predict_x0_from_eps(SCHED, xt, t, noise), x0, atol=2e-3)
  np.testing.assert_allclose(schedule.predict_eps_from_x0(SCHED, xt, t, x0), noise, atol=1e-3)


def test_posterior_matches_gaussian_conditioning_in_float64():
  # q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x0,
  # 1 - abar_{t-1}): multiply the two Gaussians instead of reusing the closed-form coefficients.
  betas, alphas, abar = _np_tables()
  rng = np.random.default_rng(1)
  t = np.array([1, 2, 50, 500, 999], np.int32)
  x0 = rng.uniform(-1, 1, (5, 3, 3, 2))
  xt = rng.standard_normal(x0.shape)
  b, al, ap = _bcast(betas[t], 4), _bcast(alphas[t], 4), _bcast(abar[t - 1], 4)
  var = 1.0 / (al / b + 1.0 / (1.0 - ap))
  mean = var * (np.sqrt(al) * xt / b + np.sqrt(ap) * x0 / (1.0 - ap))
  got_mean, got_var, got_logvar = schedule.posterior_mean_variance(
      SCHED, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_var, var, rtol=1e-5)
  np.testing.assert_allclose(got_logvar, np.log(var), rtol=1e-5)
  assert got_var.shape == (5, 1, 1, 1)
  # t = 0: x_{-1} is x0 itself (zero variance); the log-variance is clipped to that of t = 1.
  x0_first, xt_first = (jnp.asarray(v[:1], jnp.float32) for v in (x0, xt))
  m0, v0, lv0 = schedule.posterior_mean_variance(SCHED, x0_first, xt_first, jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(m0, x0[:1], atol=1e-6)
  assert float(v0.squeeze()) == 0.0
  np.testing.assert_allclose(lv0.squeeze(), np.log(betas[1] * (1 - abar[0]) / (1 - abar[1])), rtol=1e-5)


def test_schedule_lookup_with_batch_sharded_t_under_auto_mesh():
  mesh = _mesh()
  batch = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = rng.integers(0, T, 8).astype(np.int32)

  def forward(sched, x0, t, noise):
    xt = schedule.q_sample(sched, x0, t, noise)
    return xt, schedule.posterior_mean_variance(sched, x0, xt, t)[0]

  want = forward(SCHED, x0, t, noise)
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, batch) for a in (x0, t, noise)]
    got = jax.jit(forward, out_shardings=batch)(SCHED, *args)
  assert got[0].sharding.is_equivalent_to(batch, 4)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


# ---- loss ----


def test_loss_is_zero_for_perfect_predictors_and_targets_x0_in_x0_mode():
  x_star = jax.random.uniform(jax.random.key(0), (1, 4, 4, 5), minval=-1, maxval=1)
  x0 = jnp.broadcast_to(x_star, (16, 4, 4, 5))
  calls = []

  def apply_from(denoise):
    def apply_fn(params, x, t, *, train, rngs, cond):
      calls.append((params, train, cond, t.dtype, set(rngs)))
      return denoise(x, t)
    return apply_fn

  def loss(apply_fn, params, **kwargs):
    return jax.jit(lambda x0, rng: schedule.diffusion_loss(apply_fn, params, SCHED, x0, rng, **kwargs))(
        x0, jax.random.key(1))

  for prediction in schedule.PREDICTIONS:
    perfect = apply_from(_point_denoiser(SCHED, prediction, x_star))
    value, aux = loss(perfect, "params", prediction=prediction, cond="c")
    assert float(value) < 1e-6
    assert aux["loss_per_channel"].shape == (5,)
    np.testing.assert_allclose(jnp.mean(aux["loss_per_channel"]), value, rtol=1e-6)
  assert calls[0] == ("params", True, "c", jnp.int32, {"dropout"})

  zero = apply_from(lambda x, t: jnp.zeros_like(x))
  loss_x0, _ = loss(zero, None, prediction="x0", train=False)
  np.testing.assert_allclose(loss_x0, jnp.mean(x0**2), rtol=1e-5)  # target is x0
  assert calls[-1][1] is False
  loss_eps, _ = loss(zero, None, prediction="eps")
  assert 0.8 < float(loss_eps) < 1.2  # target is unit Gaussian noise
  with pytest.raises(ValueError, match="prediction"):
    schedule.diffusion_loss(zero, None, SCHED, x0, jax.random.key(1), prediction="score")


def test_loss_draws_every_timestep_uniformly_and_regresses_the_noise_by_default():
  """t ~ U{0..T-1}, 0 included (the step that learns the last denoising move), and eps is the
  default target (the paper's)."""
  sched = schedule.linear_schedule(4)
  seen = []

  def record_t(params, x, t, *, train, rngs, cond):
    seen.append(np.asarray(t))
    return jnp.zeros_like(x)

  x0 = jnp.full((4000, 1, 1, 1), 0.5)
  loss, _ = schedule.diffusion_loss(record_t, None, sched, x0, jax.random.key(0))  # eager: t is concrete
  counts = np.bincount(seen[0], minlength=5)
  assert counts[4] == 0 and np.all(np.abs(counts[:4] - 1000) < 150), counts  # 1000 +- 4.6 sigma each
  eps_loss, _ = schedule.diffusion_loss(record_t, None, sched, x0, jax.random.key(0), prediction="eps")
  assert float(loss) == float(eps_loss) and abs(float(loss) - 1.0) < 0.1  # E[eps^2], not E[x0^2] = 0.25


def test_loss_under_jit_with_sharded_batch():
  mesh = _mesh()
  batch = NamedSharding(mesh, P("data"))
  x0 = jax.random.uniform(jax.random.key(3), (8, 4, 4, 3), minval=-1, maxval=1)

  def apply_fn(params, x, t, *, train, rngs, cond):
    return params * x

  loss_fn = jax.jit(functools.partial(schedule.diffusion_loss, apply_fn, prediction="x0"))
  want, _ = loss_fn(0.5, SCHED, x0, jax.random.key(4))
  with jax.set_mesh(mesh):
    got, _ = loss_fn(0.5, SCHED, jax.device_put(x0, batch), jax.random.key(4))
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- samplers ----


def test_ddim_timesteps_trailing_spacing():
  steps = sampling.ddim_timesteps(1000, 50)
  assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 19
  assert np.all(np.diff(steps) == -20)
  np.testing.assert_array_equal(sampling.ddim_timesteps(10, 10), np.arange(9, -1, -1))
  np.testing.assert_array_equal(sampling.ddim_timesteps(10, 3), [9, 5, 2])
  with pytest.raises(ValueError, match="num_steps"):
    sampling.ddim_timesteps(10, 11)


SAMPLERS = {
    "ddpm": sampling.sample_ddpm,
    "ddim50_eta0": functools.partial(sampling.sample_ddim, num_steps=50, eta=0.0),
    "ddim50_eta1": functools.partial(sampling.sample_ddim, num_steps=50, eta=1.0),
}


@pytest.mark.parametrize("prediction", schedule.PREDICTIONS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_recover_the_single_data_point(sampler, prediction):
  x_star = jax.random.uniform(jax.random.key(0), (3, 4, 4, 7), minval=-0.95, maxval=0.95)
  denoise = _point_denoiser(SCHED, prediction, x_star)
  run = jax.jit(lambda rng: SAMPLERS[sampler](denoise, SCHED, x_star.shape, rng, prediction=prediction))
  out = run(jax.random.key(1))
  assert out.shape == x_star.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, x_star, atol=1e-4)


def _gaussian_output_moments(sampler, mean, std):
  """Exact mean and std of a sampler's output for N(mean, std^2) data, in float64.

  With the exact denoiser every step is affine in x_t plus Gaussian noise,
  x' = A x_t + c + s z, so the output moments follow from (m, v) -> (A m + c, A^2 v + s^2).
  """
  betas, alphas, abar = _np_tables()
  if sampler == "ddpm":
    steps, eta = np.arange(T - 1, -1, -1), None
  else:
    steps, eta = np.arange(50, 0, -1) * (T // 50) - 1, float(sampler[-1])
  m, v = 0.0, 1.0
  for i, t in enumerate(steps):
    a = abar[t]
    gain = np.sqrt(a) * std**2 / (a * std**2 + 1 - a)  # x0_hat = gain x_t + bias
    bias = mean * (1 - gain * np.sqrt(a))
    if eta is None:
      a_prev = abar[t - 1] if t > 0 else 1.0
      c1 = betas[t] * np.sqrt(a_prev) / (1 - a)
      c2 = (1 - a_prev) * np.sqrt(alphas[t]) / (1 - a)
      slope, offset = c1 * gain + c2, c1 * bias
      noise_var = betas[t] * (1 - a_prev) / (1 - a) if t > 0 else 0.0
    else:
      a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
      noise_var = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
      # eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a), weighted by sqrt(1 - a_prev - sigma^2).
      d = np.sqrt(1 - a_prev - noise_var) / np.sqrt(1 - a)
      slope = np.sqrt(a_prev) * gain + d * (1 - np.sqrt(a) * gain)
      offset = np.sqrt(a_prev) * bias - d * np.sqrt(a) * bias
    m, v = slope * m + offset, slope**2 * v + noise_var
  return m, np.sqrt(v)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_match_exact_output_moments_for_gaussian_data(sampler):
  # Exercises the noise scale of every step. None of these samplers is exact for Gaussian
  # data (the fixed-small variance and 50 DDIM steps shrink the spread), so compare with the
  # moments the update rules imply rather than with the data's.
  mean, std = 0.1, 0.25
  denoise = _gaussian_denoiser(SCHED, "eps", mean, std)
  shape = (4096, 4, 4, 1)  # 65536 iid values: standard errors 0.001 (mean), 0.3% (std)
  run = jax.jit(lambda rng: SAMPLERS[sampler](denoise, SCHED, shape, rng, clip_x0=False))
  out = np.asarray(run(jax.random.key(2)))
  want_mean, want_std = _gaussian_output_moments(sampler, mean, std)
  assert abs(out.mean() - want_mean) < 0.004
  assert abs(out.std() / want_std - 1.0) < 0.012
  assert 0.75 < want_std / std < 1.0


@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_with_all_steps_and_eta1_is_ddpm(clip_x0):
  sched = schedule.linear_schedule(100, 1e-3, 0.15)
  denoise = _gaussian_denoiser(sched, "eps", 0.2, 0.7)
  shape, rng = (4, 3, 3, 2), jax.random.key(5)
  ddpm = jax.jit(lambda: sampling.sample_ddpm(denoise, sched, shape, rng, clip_x0=clip_x0))()
  ddim = jax.jit(lambda: sampling.sample_ddim(denoise, sched, shape, rng, num_steps=100, eta=1.0,
                                              clip_x0=clip_x0))()
  assert float(jnp.std(ddpm)) > 0.1
  np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


def test_ddim_eta0_depends_only_on_the_initial_noise():
  # Same initial noise (same key), and eta=0 ignores the per-step draws: identical output.
  denoise = _gaussian_denoiser(SCHED, "x0", 0.0, 0.5)
  shape = (4, 2, 2, 1)
  run = jax.jit(lambda rng, eta: sampling.sample_ddim(denoise, SCHED, shape, rng, num_steps=20, eta=eta,
                                                      prediction="x0"), static_argnums=1)
  a, b = run(jax.random.key(7), 0.0), run(jax.random.key(7), 0.0)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, run(jax.random.key(8), 0.0))
  assert not np.allclose(a, run(jax.random.key(7), 1.0))


def test_conditional_sampling_jitted_with_sharded_batch():
  # A conditional "model" whose data point is its conditioning input: the sampler must return cond.
  mesh = _mesh()
  batch = NamedSharding(mesh, P("data"))
  shape = (8, 4, 4, 3)
  cond = jax.random.uniform(jax.random.key(9), shape, minval=-0.9, maxval=0.9)

  def apply_fn(params, x, t, *, train, rngs, cond):
    assert train is False
    return _point_denoiser(SCHED, "eps", params * cond)(x, t)

  @functools.partial(jax.jit, static_argnames="sharding")
  def generate(params, cond, rng, sharding=None):
    denoise = sampling.make_denoise_fn(apply_fn, params, cond)
    return sampling.sample_ddim(denoise, SCHED, shape, rng, num_steps=10, eta=1.0, sharding=sharding)

  want = generate(1.0, cond, jax.random.key(10))
  np.testing.assert_allclose(want, cond, atol=1e-4)
  with jax.set_mesh(mesh):
    got = generate(1.0, jax.device_put(cond, batch), jax.random.key(10), sharding=batch)
  assert got.sharding.is_equivalent_to(batch, 4)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_samplers_reject_bad_arguments():
  denoise = _point_denoiser(SCHED, "eps", jnp.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match="prediction"):
    sampling.sample_ddpm(denoise, SCHED, (1, 2, 2, 1), jax.random.key(0), prediction="score")
  with pytest.raises(ValueError, match="eta"):
    sampling.sample_ddim(denoise, SCHED, (1, 2, 2, 1), jax.random.key(0), num_steps=5, eta=-1.0)



def test_every_schedule_table_matches_its_float64_formula():
  # Called inside the test (not the module's SCHED), so mutation testing attributes it here.
  sched = schedule.linear_schedule(7, 2e-3, 0.3)
  betas = np.linspace(2e-3, 0.3, 7)
  abar = np.cumprod(1.0 - betas)
  prev = np.concatenate([[1.0], abar[:-1]])
  var = betas * (1 - prev) / (1 - abar)
  want = {
      "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev,
      "sqrt_alphas_cumprod": np.sqrt(abar), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
      "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
      "posterior_variance": var, "posterior_log_variance_clipped": np.log(np.concatenate([[var[1]], var[1:]])),
      "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - abar),
      "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - abar),
  }
  for name, value in want.items():
    table = getattr(sched, name)
    assert table.dtype == jnp.float32 and table.shape == (7,), name
    np.testing.assert_allclose(table, value, rtol=2e-7, atol=0, err_msg=name)
  assert sched.num_timesteps == 7
  schedule.linear_schedule(2, 0.1, 0.1)  # the smallest valid schedule: T = 2, constant betas
  for bad in [(1, 0.1, 0.2), (5, 0.0, 0.2), (5, 0.1, 1.0)]:
    with pytest.raises(ValueError):
      schedule.linear_schedule(*bad)


# ---- sampler settings the exact-denoiser tests cannot see ----


def _overshooting_x0(x, t):
  """An x0 prediction beyond the data range on both sides (reaching 1..2 and past 2), and not
  monotone in x_t, so that clipping it changes where the trajectories end (a growing one like
  1.5 x_t ends beyond +-1 either way, and the final clip hides the difference)."""
  del t
  return 2.5 * jnp.sin(3.0 * x)


def _self_clipping_x0(x, t):
  return jnp.clip(_overshooting_x0(x, t), -1.0, 1.0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_is_on_by_default_and_clips_to_exactly_minus_one_one(sampler):
  """Killed mutants: clip_x0 defaulting to False, clipping disabled, or to other bounds. The
  sampler's own clip must equal a denoiser that clips its x0 itself, and differ from no clip."""
  sched = schedule.linear_schedule(20, 1e-3, 5e-2)
  run = functools.partial(sampling.sample_ddpm if sampler == "ddpm" else
                          functools.partial(sampling.sample_ddim, num_steps=5),
                          sched=sched, shape=(16, 4, 4, 1), rng=jax.random.key(3), prediction="x0")
  default = run(_overshooting_x0)
  reference = run(_self_clipping_x0, clip_x0=False)
  np.testing.assert_allclose(default, reference, atol=1e-6)
  assert not np.allclose(run(_overshooting_x0, clip_x0=False), reference, atol=1e-3)


def test_ddim_defaults_to_the_deterministic_eta_0_and_allows_one_step():
  sched = schedule.linear_schedule(20, 1e-3, 5e-2)
  run = functools.partial(sampling.sample_ddim, _self_clipping_x0, sched, (4, 4, 4, 1), jax.random.key(0),
                          prediction="x0")
  np.testing.assert_array_equal(run(num_steps=4), run(num_steps=4, eta=0.0))
  assert not np.allclose(run(num_steps=4), run(num_steps=4, eta=1.0))
  assert sampling.ddim_timesteps(1000, 1).tolist() == [999]
  assert run(num_steps=1).shape == (4, 4, 4, 1)


# ---- v prediction, loss weighting, self-conditioning ----


def test_v_target_and_its_x0_inversion_match_float64():
  _, _, abar = _np_tables()
  rng = np.random.default_rng(0)
  x0, noise = rng.uniform(-1, 1, (5, 3)), rng.normal(size=(5, 3))
  t = np.array([0, 10, 500, 900, 999])
  a = abar[t][:, None]
  v = np.sqrt(a) * noise - np.sqrt(1 - a) * x0  # Salimans & Ho 2022
  xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  tj = jnp.asarray(t, jnp.int32)
  got_v = schedule.regression_target(SCHED, jnp.asarray(x0, jnp.float32), tj, jnp.asarray(noise, jnp.float32), "v")
  np.testing.assert_allclose(got_v, v, atol=1e-5)
  got_x0 = schedule.predict_x0(SCHED, jnp.asarray(v, jnp.float32), jnp.asarray(xt, jnp.float32), tj, "v")
  np.testing.assert_allclose(got_x0, x0, atol=1e-5)
  assert schedule.regression_target(SCHED, x0, tj, noise, "eps") is noise


def test_min_snr_weights_against_their_formula():
  _, _, abar = _np_tables()
  t = np.array([0, 100, 300, 999])
  snr = abar[t] / (1 - abar[t])
  gamma = 5.0
  want = {"x0": np.minimum(snr, gamma), "eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1)}
  for prediction, expected in want.items():
    got = schedule.loss_weights(SCHED, jnp.asarray(t), prediction, "min_snr", gamma)
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    np.testing.assert_array_equal(schedule.loss_weights(SCHED, jnp.asarray(t), prediction, "uniform", gamma), 1.0)
  assert want["x0"][0] == gamma and want["eps"][-1] == pytest.approx(1.0)  # caps low noise; eps keeps high noise


def test_weighted_loss_scales_each_example_by_its_timestep_weight():
  sched = schedule.linear_schedule(4)
  x0 = jnp.full((4000, 1, 1, 1), 0.5)

  def zero(params, x, t, *, train, rngs, cond):
    return jnp.zeros_like(x)

  uniform, _ = schedule.diffusion_loss(zero, None, sched, x0, jax.random.key(0), prediction="x0")
  weighted, _ = schedule.diffusion_loss(zero, None, sched, x0, jax.random.key(0), prediction="x0",
                                        weighting="min_snr", min_snr_gamma=0.5)
  abar = np.asarray(sched.alphas_cumprod)
  mean_weight = np.minimum(abar / (1 - abar), 0.5).mean()  # t uniform over 4 steps (same draws as above)
  assert float(uniform) == pytest.approx(0.25, rel=1e-6)
  assert float(weighted) == pytest.approx(0.25 * mean_weight, rel=0.05)
  with pytest.raises(ValueError, match="weighting"):
    schedule.diffusion_loss(zero, None, sched, x0, jax.random.key(0), weighting="snr")


def test_self_conditioning_feeds_a_stopped_estimate_on_about_half_the_steps():
  """One coin per batch: the trained pass gets zeros, or the model's own clipped x0 estimate without gradient."""
  x0 = jnp.full((2, 2, 2, 1), 0.25)
  calls = []

  def model(estimate_gradient: bool):
    def apply_fn(params, x, t, *, train, rngs, cond, self_cond):
      calls.append((np.asarray(jax.lax.stop_gradient(x)), np.asarray(jax.lax.stop_gradient(self_cond))))
      first_of_two = len(calls) == 1
      scale = params if estimate_gradient or not first_of_two else jax.lax.stop_gradient(params)
      return scale * x + self_cond
    return apply_fn

  def loss(apply_fn, params, key):
    return schedule.diffusion_loss(apply_fn, params, SCHED, x0, key, prediction="x0", self_condition=True)[0]

  used = 0
  with jax.disable_jit():  # lax.cond runs only the branch the coin picks
    for k in range(40):
      calls.clear()
      grad = jax.grad(functools.partial(loss, model(True)))(2.0, jax.random.key(k))
      if len(calls) == 1:  # no estimate: self_cond is zeros
        np.testing.assert_array_equal(calls[0][1], 0.0)
        continue
      used += 1
      (x_est, zeros), (x_trained, given) = calls
      np.testing.assert_array_equal(zeros, 0.0)  # the estimate pass itself sees zeros
      np.testing.assert_allclose(given, np.clip(2.0 * x_est, -1, 1))  # then its clipped x0 is the input
      calls.clear()
      # Whether or not the estimate pass could carry a gradient, the loss's gradient is the same: it is stopped.
      no_path = jax.grad(functools.partial(loss, model(False)))(2.0, jax.random.key(k))
      assert float(grad) == pytest.approx(float(no_path), rel=1e-6)
  assert 10 <= used <= 30, used  # about half of 40 coins


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_pass_the_previous_x0_estimate_when_self_conditioning(sampler):
  sched = schedule.linear_schedule(6)
  log = []

  def denoise(x, t, x0_prev):
    log.append(x0_prev)
    return jnp.full_like(x, 0.5) + 0.0 * x0_prev  # x0 prediction: always 0.5

  run = {"ddpm": lambda: sampling.sample_ddpm(denoise, sched, (2, 1), jax.random.key(0), prediction="x0",
                                              self_condition=True),
         "ddim": lambda: sampling.sample_ddim(denoise, sched, (2, 1), jax.random.key(0), num_steps=6,
                                              prediction="x0", self_condition=True)}[sampler]
  with jax.disable_jit():
    out = run()
  np.testing.assert_array_equal(log[0], 0.0)  # first step: zeros
  for previous in log[1:]:
    np.testing.assert_allclose(previous, 0.5)  # then the last step's estimate
  assert len(log) == 6
  np.testing.assert_allclose(out, 0.5, atol=1e-5)
