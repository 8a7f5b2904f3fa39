"""`--mode=train_metric_encoder`: the paper's sample-quality network, a U-Net segmenter on real data only.

Its encoder features replace Inception for FID / sFID and its class probabilities give IS
(jobs/sample_quality.py). It trains with `segmentation.train` and the segmenter's backbone, in its
own run `checkpoints/metric_encoder/`, apart from the experiment's segmenter arms.
"""

from __future__ import annotations

from satsynth_jax import resolved
from satsynth_jax.jobs import train_segmentation
from satsynth_jax.train.state import TrainState


def is_complete(config, workdir) -> bool:
  """The metric encoder reached segmentation.train.num_steps under this config's settings."""
  return train_segmentation.is_complete(config, workdir, resolved.SegmenterRun.metric_encoder(config))


def run(config, workdir) -> TrainState:
  """Train (or resume) the metric encoder on <workdir>/data/train."""
  return train_segmentation.train_run(config, workdir, resolved.SegmenterRun.metric_encoder(config))
