"""`--mode=train_metric_encoder`: the paper's sample-quality network, a U-Net segmenter on real data only.

Its encoder features replace Inception for FID / sFID and its class probabilities give IS
(sample_quality.py). It trains with `segmentation.train` and the segmenter's backbone, in its
own run `checkpoints/metric_encoder/`, apart from the experiment's segmenter arms.
"""

from __future__ import annotations

from satsynth_jax import segmenter
from satsynth_jax.train import segmentation
from satsynth_jax.train.state import TrainState


def run(config, workdir) -> TrainState:
  """Train (or resume) the metric encoder on <workdir>/data/train."""
  return segmentation.train_run(config, workdir, segmenter.Run.metric_encoder(config))
