"""`--mode=train_diffusion`: train G, the joint image+mask DDPM, on <workdir>/data/train (train/diffusion.py)."""

from __future__ import annotations

import functools

from satsynth_jax import generator, resolved
from satsynth_jax.infra import parallel
from satsynth_jax.train import diffusion, loop
from satsynth_jax.train.state import TrainState


def is_complete(config, workdir) -> bool:
  """G reached diffusion.train.num_steps under this config's settings (a run under others is refused)."""
  return loop.is_trained(workdir, resolved.g_run(config), config.diffusion.train.num_steps,
                         functools.partial(generator.g_shaping, config, workdir))


def run(config, workdir) -> TrainState:
  """Train G, resuming from its last checkpoint."""
  mesh = parallel.make_mesh()
  return loop.train(diffusion.make_task(config, workdir, mesh), config.diffusion.train, workdir, seed=config.seed,
                    mesh=mesh)
