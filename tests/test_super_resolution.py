"""G_SR: crisp low-res conditioning, a conditioned U-Net that learns, resumable training, the CLI."""

import copy
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config, paper_method_flags
from satsynth_jax import config_check, generator, labels
from satsynth_jax.config_check import ConfigError
from satsynth_jax.diffusion import conditioning, schedule
from satsynth_jax.infra import parallel, workdir as layout
from satsynth_jax.jobs import prepare
from satsynth_jax.train import loop, super_resolution as sr

TINY = {
    "data.image_size": 8, "data.patch_size": 32, "data.demo_num_scenes": 2, "data.demo_scene_size": 64,
    "sr.image_size": 16, "sr.model.ch": 32, "sr.model.ch_mult": (1,), "sr.model.num_res_blocks": 1,
    "sr.model.attn_resolutions": (), "sr.train.batch_size": 4, "sr.train.num_steps": 2,
    "sr.train.warmup_steps": 0, "sr.train.lr": 3e-3, "sr.train.ema_decay": 0.9, "sr.train.log_every": 1,
    "sr.train.checkpoint_every": 2, "sr.train.sample_every": 0, "sr.train.num_grid_samples": 2,
    "sr.train.grid_sampler_steps": 2,
}
K = 6  # the demo's classes: 3 bits, two of the 8 codes invalid


def _random_pair(size, seed, num_classes=K):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  mask = rng.integers(0, num_classes, (size, size)).astype(np.uint8)
  mask[:3, :5] = 255  # no-data
  return image, mask


def _example(image, mask, factor, encoding="bits"):
  return conditioning.training_pair({"image": image, "mask": mask}, factor=factor, num_classes=K, encoding=encoding,
                       ignore_index=255, no_data_code=False, fill_class=0)


# ---- conditioning ----


@pytest.mark.parametrize("factor,encoding", [(2, "bits"), (4, "bits"), (2, "onehot")])
def test_condition_labels_are_exactly_pm1_and_decode_to_the_nearest_downsampled_mask(factor, encoding):
  image, mask = _random_pair(16, seed=factor)
  ex = _example(image, mask, factor, encoding)
  cond = ex["cond"]
  assert ex["x"].shape == cond.shape == (16, 16, 3 + labels.num_label_channels(K, encoding))
  assert cond.dtype == np.float32
  assert set(np.unique(cond[..., 3:])) <= {-1.0, 1.0}
  filled = np.where(mask == 255, 0, mask)
  low_mask = filled[factor // 2::factor, factor // 2::factor]
  want = np.repeat(np.repeat(low_mask, factor, axis=0), factor, axis=1)
  np.testing.assert_array_equal(labels.decode(labels.from_signed(cond[..., 3:]), K, encoding), want)
  # The label of the high-res target itself is the full-resolution mask.
  np.testing.assert_array_equal(labels.decode(labels.from_signed(ex["x"][..., 3:]), K, encoding), filled)


def test_condition_image_is_area_downsampled_then_bilinear_upsampled():
  image, mask = _random_pair(16, seed=0)
  low = conditioning.downsample_joint(_example(image, mask, 2)["x"], 2)
  block_mean = image.astype(np.float64).reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(labels.from_signed(low[..., :3]) * 255.0, block_mean, atol=1e-3)
  cond = _example(image, mask, 2)["cond"]
  bilinear = jax.image.resize(jnp.asarray(low[..., :3]), (16, 16, 3), "linear")
  np.testing.assert_allclose(cond[..., :3], bilinear, atol=1e-5)


def test_numpy_and_jitted_conditioning_are_identical():
  # Training builds the condition in grain (NumPy); the cascade sampler in jit (JAX).
  rng = np.random.default_rng(1)
  low = rng.uniform(-1, 1, (2, 8, 8, 6)).astype(np.float32)
  from_numpy = conditioning.upsample_condition(low, 2, K, "bits")
  from_jax = jax.jit(lambda x: conditioning.upsample_condition(x, 2, K, "bits"))(jnp.asarray(low))
  assert isinstance(from_numpy, np.ndarray)
  np.testing.assert_allclose(from_jax, from_numpy, atol=1e-6)


def test_generated_labels_are_snapped_to_valid_classes():
  # G's samples carry in-between and invalid codes (bits 6 and 7 do not exist for K=6).
  rng = np.random.default_rng(2)
  low = rng.uniform(-1, 1, (4, 4, 6)).astype(np.float32)
  low[0, 0, 3:] = [1.0, 1.0, 1.0]  # code 7: nearest valid code is 3 or 5
  cond = conditioning.upsample_condition(low, 2, K, "bits")
  assert set(np.unique(cond[..., 3:])) <= {-1.0, 1.0}
  classes = labels.decode(labels.from_signed(cond[..., 3:]), K, "bits")
  assert classes.max() < K
  want = labels.decode(labels.from_signed(low[..., 3:]), K, "bits")
  np.testing.assert_array_equal(classes, np.repeat(np.repeat(want, 2, axis=0), 2, axis=1))


def test_bad_scale_factors_name_the_keys():
  not_a_multiple = load_config("demo", **(TINY | {"sr.image_size": 20}))
  with pytest.raises(ConfigError, match=r"sr.image_size=20: must be a multiple \(>= 2x\) of data.image_size=8"):
    config_check.validate(not_a_multiple, mode="train_sr")
  too_deep = load_config("demo", **(TINY | {"sr.model.ch_mult": (1,) * 7}))
  with pytest.raises(ConfigError, match=r"sr.image_size=16: .* halves it 6 times .* a multiple of 64"):
    config_check.validate(too_deep, mode="train_sr")


# ---- model, step and training on demo records ----


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("sr")
  config = load_config("demo", **TINY)
  prepare.run(config, root / "base")
  return config, root


def _workdir(root, name):
  """A fresh workdir sharing the prepared records (a symlink), with its own checkpoints."""
  workdir = root / name
  workdir.mkdir()
  (workdir / "data").symlink_to(root / "base" / "data")
  return str(workdir)


@pytest.fixture(scope="module")
def task(prepared):
  """The train_sr task on 4 devices. Its init and step are jitted below with loop.train's
  arguments, so every test and loop.train call share one compilation."""
  config, root = prepared
  mesh = parallel.make_mesh()
  return config, mesh, sr.make_task(config, str(root / "base"), mesh)


def test_sr_batches_pair_each_patch_with_its_low_res_condition(task):
  config, _, t = task
  batch = next(t.make_batches())
  assert batch["x"].shape == batch["cond"].shape == (4, 16, 16, 6)
  low = conditioning.downsample_joint(batch["x"], 2)
  np.testing.assert_allclose(batch["cond"], conditioning.upsample_condition(low, 2, K, "bits"), atol=1e-6)
  assert np.abs(batch["x"]).max() <= 1.0


@pytest.fixture(scope="module")
def overfit(task):
  """G_SR trained 40 steps on one demo batch; its loss on fixed noise draws, before and after."""
  config, mesh, t = task
  replicated, batched = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  init = jax.jit(t.init, out_shardings=replicated)
  step = jax.jit(t.step, in_shardings=(replicated, batched), out_shardings=(replicated, replicated),
                 donate_argnums=0)
  model = generator.build_sr(config)
  sched = schedule.linear_schedule(config.diffusion.timesteps)
  batch = parallel.to_global(next(t.make_batches()), mesh)

  def apply(params, x, t, **kwargs):
    return model.apply({"params": params}, x, t, **kwargs)

  @jax.jit
  def evaluate(params, cond):
    """Mean loss over 16 fixed noise draws, and the prediction for one fixed x_t at t = 500."""
    def loss(key):
      return schedule.diffusion_loss(apply, params, sched, batch["x"], key, train=False, cond=cond,
                                     prediction=config.diffusion.prediction)[0]
    t = jnp.full((4,), 500)
    xt = schedule.q_sample(sched, batch["x"], t, jax.random.normal(jax.random.key(10), batch["x"].shape))
    prediction = apply(params, xt, t, cond=cond)
    return jnp.mean(jax.vmap(loss)(jax.random.split(jax.random.key(9), 16))), prediction

  state = init(jax.random.key(0))
  with jax.set_mesh(mesh):
    before, _ = evaluate(state.params, batch["cond"])
    for _ in range(40):
      state, metrics = step(state, batch)
    after = evaluate(state.params, batch["cond"])
    # Each example conditioned on another example's low-res pair.
    swapped = evaluate(state.params, jnp.roll(batch["cond"], 1, axis=0))
  return state, float(before), parallel.to_host(after), parallel.to_host(swapped), parallel.to_host(metrics)


def test_one_batch_overfit_reduces_the_loss(overfit):
  state, before, (after, _), _, metrics = overfit
  assert int(state.step) == 40
  assert 0.2 < before < 1.2  # zero-initialised output against unit noise (eps) or the data (x0)
  assert after < 0.35 * before
  assert set(metrics) == {"loss", "loss_image", "loss_label", "grad_norm", "lr"}


def test_prediction_depends_on_the_condition(overfit):
  state, _, (loss, prediction), (swapped_loss, swapped_prediction), _ = overfit
  assert state.params["conv_in"]["kernel"].shape[2] == 2 * 6  # noisy pair + condition
  change = np.abs(prediction - swapped_prediction).mean(axis=(1, 2, 3))
  assert np.all(change > 0.1 * np.abs(prediction).mean())
  assert swapped_loss > 1.1 * loss  # another example's low-res pair misleads the trained denoiser


@pytest.fixture(scope="module")
def cli_workdir(prepared):
  """`--mode=train_sr` for 2 steps (of the same config) with a preview at step 2."""
  config, root = prepared
  workdir = _workdir(root, "cli")
  overrides = [f"--config.{k}={v}" for k, v in TINY.items() if not k.startswith("data.demo")]
  result = subprocess.run(
      [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", *paper_method_flags(), f"--workdir={workdir}",
       "--mode=train_sr", *overrides, "--config.sr.train.sample_every=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_cli_trains_checkpoints_and_writes_a_preview(cli_workdir):
  assert sorted(os.listdir(layout.checkpoint_dir(cli_workdir, "super_resolution_x0"))) == ["2", "config.json"]
  assert os.path.exists(os.path.join(cli_workdir, "samples", "super_resolution_x0_step00000002.png"))
  lines = open(os.path.join(cli_workdir, "metrics", "super_resolution_x0.jsonl")).read().splitlines()
  assert len(lines) == 2 and '"loss_label"' in lines[0]


@pytest.fixture(scope="module")
def four_steps(task, prepared, cli_workdir):
  """(2 steps by the CLI + 2 resumed, 4 uninterrupted steps, its workdir)."""
  config, mesh, t = task
  train = copy.deepcopy(config.sr.train)
  train.num_steps = 4
  resumed = loop.train(t, train, cli_workdir, seed=config.seed, mesh=mesh)
  fresh_dir = _workdir(prepared[1], "fresh")
  return resumed, loop.train(t, train, fresh_dir, seed=config.seed, mesh=mesh), fresh_dir


def test_resume_gives_the_same_params_as_an_uninterrupted_run(four_steps):
  resumed, fresh, _ = four_steps
  assert int(resumed.step) == int(fresh.step) == 4
  trees = [parallel.to_host((s.params, s.ema_params, s.opt_state)) for s in (resumed, fresh)]
  for a, b in zip(*map(jax.tree.leaves, trees)):
    np.testing.assert_array_equal(a, b)


def test_restored_checkpoint_upsamples_low_res_pairs(task, four_steps):
  config, mesh, _ = task
  _, fresh, workdir = four_steps
  _, model, params, step = generator.restore_sr(config, workdir, mesh, step=-1)
  assert step == 4
  for a, b in zip(jax.tree.leaves(parallel.to_host(params)), jax.tree.leaves(parallel.to_host(fresh.ema_params))):
    np.testing.assert_array_equal(a, b)
  low = np.random.default_rng(3).uniform(-1, 1, (4, 8, 8, 6)).astype(np.float32)
  upsample = generator.make_upsample_fn(config, model, mesh, 4, sampler="ddim", ddim_steps=2)
  with jax.set_mesh(mesh):
    out = upsample(params, jax.random.key(0), low)
  assert out.shape == (4, 16, 16, 6) and out.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 4)
  assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).max()) <= 1.0
  with pytest.raises(ValueError, match=r"low-res joint has shape \(4, 16, 16, 6\), expected \(4, 8, 8, 6\)"):
    upsample(params, jax.random.key(0), np.zeros((4, 16, 16, 6), np.float32))
