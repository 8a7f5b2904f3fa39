"""G_SR: the super-resolution DDPM of the cascade, its conditioning, `--mode=train_sr`.

G_SR is G's U-Net (diffusion.py) at `config.sr.image_size`, with its own `config.sr.model`
and `config.sr.train`, and G's noise schedule (`config.diffusion`). At every denoising step
its input is the noisy high-res joint pair concatenated (channel axis) with the low-res pair
upsampled to high res: the image bilinearly, the label code by nearest neighbour after
snapping it to the nearest valid class, so the condition's label channels are exactly ±1 and
its class edges stay crisp. The cascade is (x, y) = G_SR(z1, G(z0)).

Training pairs are real patches at sr.image_size and their downsampled versions: the image
area-averaged (as the data pipeline shrinks images), the mask sampled at the low-res pixel
centres (nearest, as the pipeline resizes masks). The same NumPy/JAX functions build the
condition in the grain pipeline and inside the jitted cascade sampler, so training and
sampling see identical conditioning.
"""

from __future__ import annotations

import copy
import functools
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from satsynth_jax import checkpoint, labels, parallel, viz
from satsynth_jax.config_check import ConfigError
from satsynth_jax.data import pipeline, records
from satsynth_jax.diffusion import sampling
from satsynth_jax.models.unet import UNet
from satsynth_jax.train import diffusion, loop, optim
from satsynth_jax.train.state import TrainState

MODEL_NAME = "super_resolution"  # <workdir>/checkpoints/super_resolution/


def scale_factor(config) -> int:
  """sr.image_size / data.image_size, an integer >= 2 (checked, naming the keys)."""
  low, high = config.data.image_size, config.sr.image_size
  if high <= low or high % low:
    raise ConfigError(f"config.sr.image_size={high}: must be a multiple (>= 2x) of "
                      f"config.data.image_size={low}")
  levels = len(config.sr.model.ch_mult)
  if high % 2 ** (levels - 1):
    raise ConfigError(f"config.sr.image_size={high}: the SR U-Net halves it {levels - 1} times "
                      f"(sr.model.ch_mult={tuple(config.sr.model.ch_mult)}), so it must be a multiple "
                      f"of {2 ** (levels - 1)}")
  return high // low


def high_res_config(config):
  """A copy of `config` as G's code reads it for G_SR: data.image_size, model and train from `sr`.

  diffusion.make_model, the data pipeline's `pairs` and the preview grid then work at high res.
  """
  scale_factor(config)
  view = copy.deepcopy(config)
  view.data.image_size = config.sr.image_size
  view.model = copy.deepcopy(config.sr.model)
  view.train = copy.deepcopy(config.sr.train)
  return view


# ---- conditioning: NumPy (grain workers) or JAX (jitted sampler), the same arithmetic ----


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def downsample_joint(joint, factor: int):
  """Joint pairs [..., S, S, 3 + C] -> [..., S/f, S/f, 3 + C]: image area mean, labels nearest.

  Label channels are sampled at the low-res pixel centres (row f*i + f//2), which keeps
  them valid codes; averaging them would blend classes at edges.
  """
  *lead, height, width, channels = joint.shape
  if height % factor or width % factor:
    raise ValueError(f"joint of {height}x{width} pixels is not divisible by the scale factor {factor}")
  image = joint[..., :3].reshape(*lead, height // factor, factor, width // factor, factor, 3)
  image = image.mean(axis=(-4, -2))
  label = joint[..., factor // 2::factor, factor // 2::factor, 3:]
  return _xp(joint).concatenate([image, label], axis=-1)


def _linear_weights(size: int, factor: int) -> np.ndarray:
  """[size * f, size] bilinear weights with half-pixel centres, clamped at the borders."""
  source = np.clip((np.arange(size * factor) + 0.5) / factor - 0.5, 0.0, size - 1)
  left = np.floor(source).astype(np.intp)
  right = np.minimum(left + 1, size - 1)
  frac = source - left
  weights = np.zeros((size * factor, size), np.float32)
  rows = np.arange(size * factor)
  np.add.at(weights, (rows, left), 1.0 - frac)
  np.add.at(weights, (rows, right), frac)
  return weights


def upsample_condition(low_joint, factor: int, num_classes: int, encoding: str = "bits"):
  """Low-res joint pairs [..., s, s, 3 + C] in [-1, 1] -> G_SR's condition [..., s*f, s*f, 3 + C].

  Image channels: bilinear. Label channels: snapped to the nearest valid class code (a no-op
  for real data; for G's samples it removes the in-between values), then nearest-upsampled,
  so they are exactly ±1.
  """
  xp = _xp(low_joint)
  height, width = low_joint.shape[-3:-1]
  rows = xp.asarray(_linear_weights(height, factor))
  cols = xp.asarray(_linear_weights(width, factor))
  image = xp.einsum("ih,...hwc,jw->...ijc", rows, low_joint[..., :3].astype(xp.float32), cols)
  classes = labels.decode(labels.from_signed(low_joint[..., 3:]), num_classes, encoding)
  label = labels.to_signed(labels.encode(classes, num_classes, encoding))
  label = xp.repeat(xp.repeat(label, factor, axis=-3), factor, axis=-2)
  return xp.concatenate([image, label], axis=-1)


def sr_example(example: dict, *, factor: int, num_classes: int, encoding: str, ignore_index: int,
               fill_class: int) -> dict:
  """A high-res pair -> {"x": its joint in [-1, 1], "cond": its upsampled low-res version}."""
  mask = np.where(example["mask"] == ignore_index, fill_class, example["mask"])
  joint = labels.encode_pair(example["image"], mask, num_classes, encoding).astype(np.float32)
  cond = upsample_condition(downsample_joint(joint, factor), factor, num_classes, encoding)
  return {"x": joint, "cond": cond.astype(np.float32)}


def _example_fn(config):
  """sr_example with the config's scale factor and label settings (picklable for grain workers)."""
  d = config.data
  return functools.partial(sr_example, factor=scale_factor(config), num_classes=d.num_classes,
                           encoding=d.label_encoding, ignore_index=d.ignore_index, fill_class=d.ignore_fill_class)


def _real_pairs(config, record_dir: str) -> records.PairSource:
  source = records.PairSource(record_dir)
  if source.num_classes != config.data.num_classes:
    raise ConfigError(f"{record_dir}: records have num_classes={source.num_classes}, "
                      f"but config.data.num_classes={config.data.num_classes}")
  return source


def sr_batches(config, record_dir: str, *, batch_size: int, seed: int, process_index: int | None = None,
               process_count: int | None = None) -> grain.IterDataset:
  """Endless per-process batches {"x", "cond": float32[B, S, S, 3 + C]} at S = sr.image_size."""
  ds = pipeline.pairs(_real_pairs(config, record_dir), high_res_config(config), seed=seed, train=True,
                      process_index=process_index, process_count=process_count)
  ds = ds.map(_example_fn(config))
  options = grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=2 * batch_size)
  return ds.to_iter_dataset(options).batch(batch_size, drop_remainder=True)


# ---- model, step, sampler ----


def make_model(config) -> UNet:
  return diffusion.make_model(high_res_config(config))


def init_state(config, model: UNet, rng: jax.Array) -> TrainState:
  return diffusion.init_state(high_res_config(config), model, rng, conditional=True)


def make_upsample_fn(config, model: UNet, mesh, num: int, *, sampler: str, ddim_steps: int = 50,
                     ddim_eta: float = 0.0):
  """Jitted (params, rng, low_res_joint [num, s, s, C]) -> high-res joint [num, S, S, C] in [-1, 1].

  The cascade's second stage: `low_res_joint` is G's output (or any joint pair in [-1, 1]) at
  s = data.image_size, turned into the condition by `upsample_condition` (labels snapped to
  valid classes); S = sr.image_size. `num` rows are split over `mesh` and the result stays
  batch-sharded. The whole reverse process runs in one program.
  """
  factor = scale_factor(config)
  d = config.data
  sched = diffusion.make_schedule(config)
  size = config.sr.image_size
  channels = diffusion.joint_channels(config)
  sharding = parallel.batch_sharding(mesh)
  prediction = config.diffusion.prediction
  if sampler not in ("ddpm", "ddim"):
    raise ValueError(f"sampler={sampler!r}: must be 'ddpm' or 'ddim'")

  def upsample(params, rng, low_res_joint):
    expected = (num, d.image_size, d.image_size, channels)
    if low_res_joint.shape != expected:
      raise ValueError(f"low-res joint has shape {low_res_joint.shape}, expected {expected} "
                       f"(num, data.image_size, data.image_size, 3 + label channels)")
    cond = upsample_condition(low_res_joint, factor, d.num_classes, d.label_encoding)
    denoise = sampling.make_denoise_fn(diffusion.apply_fn(model), params, jax.lax.with_sharding_constraint(cond, sharding))
    shape = (num, size, size, channels)
    if sampler == "ddpm":
      return sampling.sample_ddpm(denoise, sched, shape, rng, prediction=prediction, sharding=sharding)
    return sampling.sample_ddim(denoise, sched, shape, rng, num_steps=ddim_steps, eta=ddim_eta,
                                prediction=prediction, sharding=sharding)

  return jax.jit(upsample, out_shardings=sharding)


def restore_sr_params(config, workdir: str, mesh, step: int | None):
  """(model, EMA params replicated on `mesh`, checkpoint step) of G_SR."""
  model = make_model(config)
  state, step = checkpoint.restore_for_inference(workdir, MODEL_NAME, lambda rng: init_state(config, model, rng),
                                                 mesh, step)
  return model, state.eval_params, step


# ---- --mode=train_sr ----


def _preview(config, model, mesh, workdir: str, writer_enabled: bool):
  """Every sr.train.sample_every steps: real low-res input | G_SR output (EMA, DDIM) | real high-res."""
  t = config.sr.train
  num = t.num_grid_samples + (-t.num_grid_samples) % mesh.size  # extra rows are dropped
  view = high_res_config(config)
  # Every process reads the same first examples, so the batch is the same everywhere.
  real = pipeline.pairs(_real_pairs(config, os.path.join(workdir, "data", "train")), view, seed=config.seed,
                        train=False, process_index=0, process_count=1)
  d = config.data
  example = _example_fn(config)
  batch = [example(real[i % len(real)]) for i in range(num)]
  high = np.stack([b["x"] for b in batch])
  low = downsample_joint(high, scale_factor(config))
  rows = t.num_grid_samples
  low_up, high = np.stack([b["cond"] for b in batch[:rows]]), high[:rows]
  upsample = make_upsample_fn(config, model, mesh, num, sampler="ddim",
                              ddim_steps=min(t.grid_sampler_steps, config.diffusion.timesteps))

  def preview(state: TrainState, step: int):
    out = parallel.to_host(upsample(state.eval_params, jax.random.key(config.seed), low))
    if not writer_enabled:
      return
    columns = np.stack([low_up, out[:rows], high], axis=1)  # one grid row per example
    images, masks = diffusion.decode_samples(config, columns.reshape(-1, *high.shape[1:]))
    captions = ["low-res input", "G_SR output", "real high-res"] * rows
    grid = viz.pair_grid(images, masks, d.palette, d.ignore_index, columns=3,
                         tile_size=max(96, config.sr.image_size), captions=captions, class_names=d.class_names,
                         title=f"{MODEL_NAME}: EMA upsampling at step {step}")
    path = os.path.join(workdir, "samples", f"{MODEL_NAME}_step{step:08d}.png")
    viz.save_png(grid, path)
    logging.info("wrote %s", path)

  return preview


def make_task(config, workdir: str, mesh) -> loop.Task:
  if config.data.patch_size < config.sr.image_size:
    logging.warning("data.patch_size=%d < sr.image_size=%d: G_SR trains on enlarged patches, so it learns to "
                    "upsample blurry targets; prepare larger patches for it", config.data.patch_size,
                    config.sr.image_size)
  model = make_model(config)
  sched = diffusion.make_schedule(config)
  _, lr_schedule = optim.make_optimizer(config.sr.train)
  real_dir = os.path.join(workdir, "data", "train")
  batch = parallel.per_process_batch_size(config.sr.train.batch_size, "sr.train.batch_size", mesh)
  preview = None
  if config.sr.train.sample_every:
    preview = _preview(config, model, mesh, workdir, writer_enabled=jax.process_index() == 0)
  return loop.Task(
      name=MODEL_NAME,
      init=functools.partial(init_state, config, model),
      step=functools.partial(diffusion.train_step, model=model, sched=sched, prediction=config.diffusion.prediction,
                             lr_schedule=lr_schedule),
      make_batches=lambda: iter(sr_batches(config, real_dir, batch_size=batch, seed=config.seed)),
      preview=preview,
  )


def run(config, workdir: str) -> TrainState:
  """--mode=train_sr: train G_SR on <workdir>/data/train, resuming from its last checkpoint."""
  mesh = parallel.make_mesh()
  return loop.train(make_task(config, workdir, mesh), config.sr.train, workdir, seed=config.seed, mesh=mesh)
