"""diffusion.class_weight_power: G's loss weighs each pixel by its class's train share^-power.

The weights (train/diffusion.class_weights), the per-pixel weight map the input pipeline builds
from each mask (no-data weighs 1), the weighted loss against a hand computation, and a G trained
with them end to end (its identity records the power)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_G_RUN, load_config, prepared_demo
from satsynth_jax import resolved
from satsynth_jax.data import pipeline
from satsynth_jax.diffusion import schedule
from satsynth_jax.infra import identity, workdir as layout
from satsynth_jax.jobs import train_diffusion
from satsynth_jax.train import diffusion as train_diffusion_lib


def _config(power):
  config = load_config("demo")
  config.diffusion.class_weight_power = power
  return config


def test_power_zero_is_the_papers_loss_and_a_positive_power_favours_rare_classes():
  pixels = np.array([900, 90, 10, 0], np.int64)  # a common, a rarer, a rare and an absent class
  assert train_diffusion_lib.class_weights(_config(0.0), pixels) is None
  weights = train_diffusion_lib.class_weights(_config(0.5), pixels)
  share = pixels / pixels.sum()
  # Unnormalised share^-0.5 is 1/sqrt(.9), 1/sqrt(.09), 1/sqrt(.01): ratios sqrt(10) and 3.
  np.testing.assert_allclose(weights[1] / weights[0], np.sqrt(10), rtol=1e-5)
  np.testing.assert_allclose(weights[2] / weights[1], np.sqrt(9), rtol=1e-5)
  np.testing.assert_allclose(np.sum(share * weights), 1.0, rtol=1e-6)  # mean weight over train pixels
  assert weights[3] == pytest.approx(1.0 / np.sum(share[:3] * share[:3] ** -0.5))  # absent: unscaled 1
  heavier = train_diffusion_lib.class_weights(_config(1.0), pixels)
  assert heavier[2] / heavier[0] == pytest.approx(90.0, rel=1e-5)


def test_each_pixel_weighs_its_class_and_no_data_weighs_one(tmp_path_factory):
  table = np.array([1.0, 2.0, 3.0, 1.0], np.float32)  # three classes, then no-data
  mask = np.array([[0, 1, 2], [2, 255, 0]], np.uint8)
  example = {"image": np.zeros((2, 3, 3), np.uint8), "mask": mask}
  out = pipeline._diffusion_example(example, num_classes=3, encoding="bits", ignore_index=255, no_data_code=False,
                                    fill_class=0, weight_table=table)
  np.testing.assert_array_equal(out["weights"], [[1.0, 2.0, 3.0], [3.0, 1.0, 1.0]])
  # The batches carry the map beside x, pixel for pixel, and leave x as it was.
  config, workdir = prepared_demo(tmp_path_factory, "weights", {})
  config.data.augment = False
  train_dir = layout.data_dir(workdir, "train")
  weights = np.arange(1, 7, dtype=np.float32)
  batch = next(iter(pipeline.diffusion_batches(config, train_dir, batch_size=4, seed=0, class_weights=weights)))
  plain = next(iter(pipeline.diffusion_batches(config, train_dir, batch_size=4, seed=0)))
  assert "weights" not in plain and batch["weights"].shape == batch["x"].shape[:3]
  np.testing.assert_array_equal(plain["x"], batch["x"])
  assert set(np.unique(batch["weights"]).tolist()) <= set(weights.tolist()) and len(np.unique(batch["weights"])) > 2


def test_the_weighted_loss_is_the_mean_of_weighted_squared_errors():
  sched = schedule.linear_schedule(10)
  x0 = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1, maxval=1)
  weights = jnp.where(jnp.arange(4)[None, :, None] < 2, 3.0, 1.0) * jnp.ones((2, 4, 4))

  def zero(params, x, t, *, train, rngs, cond):
    return jnp.zeros_like(x)

  loss, aux = schedule.diffusion_loss(zero, None, sched, x0, jax.random.key(1), prediction="x0",
                                      pixel_weights=weights)
  np.testing.assert_allclose(loss, jnp.mean(weights[..., None] * x0**2), rtol=1e-5)
  ones, _ = schedule.diffusion_loss(zero, None, sched, x0, jax.random.key(1), prediction="x0",
                                    pixel_weights=jnp.ones((2, 4, 4)))
  plain, _ = schedule.diffusion_loss(zero, None, sched, x0, jax.random.key(1), prediction="x0")
  np.testing.assert_allclose(ones, plain, rtol=1e-6)
  assert aux["loss_per_channel"].shape == (3,)


def test_a_class_weighted_g_trains_and_records_its_power(tmp_path_factory):
  config, workdir = prepared_demo(tmp_path_factory, "weighted_g", {**TINY_G_RUN, "diffusion.class_weight_power": 0.5})
  train_diffusion.run(config, workdir)
  run = resolved.g_run(config)
  assert identity.read(layout.checkpoint_dir(workdir, run))["shaping"]["diffusion.class_weight_power"] == 0.5
  rows = [json.loads(line) for line in layout.metrics_path(workdir, run, ".jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in rows if "loss" in row]
  assert losses and all(np.isfinite(losses))
  # The same G at the paper's power is another run: it is refused, not resumed.
  config.diffusion.class_weight_power = 0.0
  with pytest.raises(identity.SettingsMismatchError, match=r"diffusion.class_weight_power: 0.5 -> 0.0"):
    train_diffusion.run(config, workdir)


@pytest.mark.parametrize("power", [-1.0, 2.5, float("nan"), float("inf")])
def test_a_power_outside_zero_to_two_is_refused_naming_the_key(power):
  from satsynth_jax import config_check

  config = load_config("demo", **{"diffusion.class_weight_power": power})
  with pytest.raises(config_check.ConfigError, match=r"diffusion.class_weight_power=.*: must be a number in \[0.0, 2.0\]"):
    config_check.validate(config, mode="train_diffusion")
