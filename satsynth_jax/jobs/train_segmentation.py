"""`--mode=train_segmentation`: train this config's segmenter run (train/segmentation.py) on D, or on D u D'
when data.synthetic_ratio R > 0 (the set resolved.synthetic_dir names)."""

from __future__ import annotations

from satsynth_jax import resolved, segmenter
from satsynth_jax.infra import parallel
from satsynth_jax.train import loop, segmentation
from satsynth_jax.train.state import TrainState


def is_complete(config, workdir, run: resolved.SegmenterRun, synthetic_dir=None) -> bool:
  """`run` reached segmentation.train.num_steps under this config's settings, on the set in `synthetic_dir`
  (R > 0) as that set is now; a run under other settings is refused."""

  def shaping():
    synthetic = segmentation.set_identity(synthetic_dir) if run.synthetic_ratio > 0 else None
    return segmenter.shaping(config, run, synthetic, workdir)

  return loop.is_trained(workdir, run.name, config.segmentation.train.num_steps, shaping)


def train_run(config, workdir, run: resolved.SegmenterRun, synthetic_dir=None) -> TrainState:
  """Train (or resume) one segmenter run; `synthetic_dir` is the set mixed in when run.synthetic_ratio > 0."""
  mesh = parallel.make_mesh()
  return loop.train(segmentation.make_task(config, workdir, mesh, run, synthetic_dir), config.segmentation.train,
                    workdir, seed=run.seed, mesh=mesh)


def run(config, workdir) -> TrainState:
  """Train this config's run (data.synthetic_ratio, seed), resuming from its checkpoint."""
  return train_run(config, workdir, resolved.SegmenterRun.from_config(config), resolved.synthetic_dir(config, workdir))
