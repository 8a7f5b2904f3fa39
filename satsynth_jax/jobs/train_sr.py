"""`--mode=train_sr`: train G_SR, the cascade's super-resolution DDPM, on <workdir>/data/train
(train/super_resolution.py)."""

from __future__ import annotations

import functools

from absl import logging

from satsynth_jax import generator, resolved
from satsynth_jax.infra import parallel
from satsynth_jax.train import loop, super_resolution
from satsynth_jax.train.state import TrainState


def is_complete(config, workdir) -> bool:
  """G_SR reached sr.train.num_steps under this config's settings (a run under others is refused)."""
  return loop.is_trained(workdir, resolved.sr_run(config), config.sr.train.num_steps,
                         functools.partial(generator.sr_shaping, config, workdir))


def run(config, workdir) -> TrainState:
  """Train G_SR, resuming from its last checkpoint."""
  if config.data.patch_size < config.sr.image_size:
    logging.warning("data.patch_size=%d < sr.image_size=%d: G_SR trains on enlarged patches, so it learns to "
                    "upsample blurry targets; prepare larger patches for it", config.data.patch_size,
                    config.sr.image_size)
  mesh = parallel.make_mesh()
  return loop.train(super_resolution.make_task(config, workdir, mesh), config.sr.train, workdir, seed=config.seed,
                    mesh=mesh)
