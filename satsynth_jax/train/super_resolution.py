"""G_SR's training task (jobs/train_sr.py runs it): the cascade's super-resolution DDPM, on real pairs.

G_SR is G's U-Net at `sr.image_size` with its own `sr.model` and `sr.train`, and G's noise
schedule (`config.diffusion`); generator.py builds and samples it. Each training pair is a
real patch at sr.image_size (the target) and its downsampled, re-upsampled version (the
condition, diffusion/conditioning.py), exactly as the cascade sampler conditions on G's output.
"""

from __future__ import annotations

import functools

import grain
import jax
import numpy as np
from absl import logging

from satsynth_jax import generator, resolved
from satsynth_jax.data import pipeline
from satsynth_jax.diffusion import conditioning
from satsynth_jax.infra import parallel, viz, workdir as layout
from satsynth_jax.train import diffusion, loop
from satsynth_jax.train.state import TrainState


def _example_fn(config):
  """conditioning.training_pair with the config's scale factor and label settings (picklable)."""
  d = config.data
  return functools.partial(conditioning.training_pair, factor=generator.sr_factor(config),
                           num_classes=d.num_classes, encoding=d.label_encoding, ignore_index=d.ignore_index,
                           no_data_code=d.no_data_code, fill_class=d.ignore_fill_class)


def _real_pairs(config, workdir, *, seed: int, train: bool, **shard) -> grain.MapDataset:
  """Real train pairs at G_SR's resolution."""
  source = pipeline.open_records(layout.data_dir(workdir, "train"), config)
  return pipeline.pairs(source, config, seed=seed, train=train, size=config.sr.image_size, **shard)


def sr_batches(config, workdir, *, batch_size: int, seed: int, process_index: int | None = None,
               process_count: int | None = None) -> grain.IterDataset:
  """Endless per-process batches {"x", "cond": float32[B, S, S, 3 + C]} at S = sr.image_size."""
  ds = _real_pairs(config, workdir, seed=seed, train=True, process_index=process_index,
                   process_count=process_count).map(_example_fn(config))
  options = grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=2 * batch_size)
  return ds.to_iter_dataset(options).batch(batch_size, drop_remainder=True)


def _preview(config, model, mesh, workdir):
  """Every sr.train.sample_every steps: real low-res input | G_SR output (EMA, DDIM) | real high-res."""
  t = config.sr.train
  num = t.num_grid_samples + (-t.num_grid_samples) % mesh.size  # extra rows are dropped
  # Every process reads the same first examples, so the batch is the same everywhere.
  real = _real_pairs(config, workdir, seed=config.seed, train=False, process_index=0, process_count=1)
  example = _example_fn(config)
  batch = [example(real[i % len(real)]) for i in range(num)]
  high = np.stack([b["x"] for b in batch])
  low = conditioning.downsample_joint(high, generator.sr_factor(config))
  rows = t.num_grid_samples
  low_up, high = np.stack([b["cond"] for b in batch[:rows]]), high[:rows]
  upsample = generator.make_upsample_fn(config, model, mesh, num, sampler="ddim",
                                        ddim_steps=min(t.grid_sampler_steps, config.diffusion.timesteps))
  name = resolved.sr_run(config)

  def preview(state: TrainState, step: int):
    out = parallel.to_host(upsample(state.eval_params, jax.random.key(config.seed), low))
    if jax.process_index() != 0:
      return
    columns = np.stack([low_up, out[:rows], high], axis=1)  # one grid row per example
    images, masks = generator.decode_samples(config, columns.reshape(-1, *high.shape[1:]), np.random.default_rng(step))
    grid = generator.sample_grid(config, images, masks, f"{name}: EMA upsampling at step {step}",
                                 columns=3, captions=["low-res input", "G_SR output", "real high-res"] * rows)
    path = viz.save_png(grid, layout.samples_path(workdir, f"{name}_step{step:08d}.png"))
    logging.info("wrote %s", path)

  def compile_sampler(state_shapes) -> None:
    upsample.lower(state_shapes.eval_params, jax.random.key(config.seed), low).compile()

  return preview, compile_sampler


def make_task(config, workdir, mesh) -> loop.Task:
  """The loop's task for G_SR."""
  return diffusion.diffusion_task(
      config, workdir, mesh, section="sr", name=resolved.sr_run(config), model=generator.build_sr(config),
      size=config.sr.image_size,
      batches=lambda batch: iter(sr_batches(config, workdir, batch_size=batch, seed=config.seed)),
      preview=_preview, shaping=generator.sr_shaping, conditional=True)
