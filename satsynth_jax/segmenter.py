"""The segmenter as inference sees it: runs, architectures, variables, restore.

A segmenter run is one trained model with its own checkpoint folder: the experiment's arms
(real only, R = 0, or real + synthetic, R > 0) and the metric encoder (a U-Net segmenter
on real data whose features score samples). `Run` names one; training (train/segmentation.py)
and inference (evaluate.py, sample_quality.py) both start from it, so no job forges a config.

Names: "<architecture>_r0_s<seed>" on real data, "<architecture>_r<R>_<synthetic set>_s<seed>"
with synthetic pairs, so arms trained on different sets (x0 or one-hot generators, a
curated set) live side by side; "metric_encoder" for the metric network.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from satsynth_jax import checkpoint, generator, identity, resolved, workdir as layout
from satsynth_jax.models.fpn import FPNSegmenter
from satsynth_jax.models.unet_seg import UNetSegmenter

ARCHITECTURES = {"fpn": FPNSegmenter, "unet": UNetSegmenter}
METRIC_ENCODER = "metric_encoder"  # the metric encoder's run name


@dataclasses.dataclass(frozen=True)
class Run:
  """One segmenter run: its checkpoint folder `name`, architecture, synthetic share R, set and seed."""
  name: str
  architecture: str
  synthetic_ratio: int
  seed: int
  synthetic_set: str | None = None  # the synthetic set's name when R > 0

  @classmethod
  def from_config(cls, config) -> "Run":
    """The run `--mode=train_segmentation` / `--mode=evaluate` work on (data.synthetic_ratio, seed)."""
    synthetic = config.data.synthetic_dir
    name = pathlib.Path(synthetic).name if synthetic else resolved.synthetic_set(config)
    return cls.arm(config, config.data.synthetic_ratio, config.seed, name)

  @classmethod
  def arm(cls, config, synthetic_ratio: int, seed: int, synthetic_set: str | None) -> "Run":
    """The segmenter run of one experiment arm (R, set) and seed."""
    architecture = config.segmentation.architecture
    if synthetic_ratio == 0:
      return cls(f"{architecture}_r0_s{seed}", architecture, 0, seed)
    return cls(f"{architecture}_r{synthetic_ratio}_{synthetic_set}_s{seed}", architecture, synthetic_ratio, seed,
               synthetic_set)

  @classmethod
  def metric_encoder(cls, config) -> "Run":
    """The paper's ResNet-50 U-Net segmenter on real data only: the FID/sFID/IS feature network."""
    return cls(METRIC_ENCODER, "unet", 0, config.seed)


SHAPING = ("dtype", "data.num_classes", "data.ignore_index", "data.augment", "data.resize",
           "segmentation.backbone_stages", "segmentation.base_width", "segmentation.pretrained_path",
           "segmentation.image_size")


def shaping(config, run: Run, synthetic: dict | None, workdir=None) -> dict:
  """The settings that shape a segmenter run; `synthetic` is the recorded identity of its set (R > 0);
  with `workdir`, also what its prepared train split is (prepare.data_identity)."""
  out = {**identity.select(config, SHAPING), **generator.train_shaping(config, "segmentation.train"),
         "architecture": run.architecture, "synthetic_ratio": run.synthetic_ratio, "seed": run.seed,
         "input_size": resolved.segmenter_size(config),  # data.image_size when segmentation.image_size is 0
         **generator.data_shaping(workdir)}
  if run.synthetic_ratio > 0:
    out.update({"data.synthetic_fraction": config.data.synthetic_fraction, "synthetic_set": synthetic})
  return out


def build(config, architecture: str) -> nn.Module:
  g = config.segmentation
  return ARCHITECTURES[architecture](num_classes=config.data.num_classes,
                                     backbone_stages=tuple(int(n) for n in g.backbone_stages),
                                     dtype=jnp.dtype(config.dtype), base_width=int(g.base_width))


def init_variables(model: nn.Module, size: int, rng: jax.Array) -> dict:
  """{"params", "batch_stats"} of a fresh model for size x size RGB inputs."""
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


def restore(config, workdir, run: Run, mesh, step: int | None = None) -> tuple[nn.Module, dict, int]:
  """(model, {"params", "batch_stats"} replicated on `mesh`, checkpoint step) of `run`; latest if step None.

  The params are the EMA weights when the run kept them. A run trained with other settings than
  `config`'s (or on other prepared data) is refused naming each key, before any checkpoint is read.
  """
  check_trained_with(config, workdir, run)
  model = build(config, run.architecture)
  abstract = jax.eval_shape(functools.partial(init_variables, model, resolved.segmenter_size(config)),
                            jax.random.key(0))
  mode = "train_metric_encoder" if run.name == METRIC_ENCODER else "train_segmentation"
  variables, step = checkpoint.restore_inference(layout.checkpoint_dir(workdir, run.name), abstract, mesh, step,
                                                 hint=f"run --mode={mode} first")
  return model, variables, step


def check_trained_with(config, workdir, run: Run) -> None:
  """Refuse a run whose recorded shaping differs from `config`'s on this workdir's data (its synthetic
  set as recorded: scoring a run never reads that set), or whose config.json is damaged or gone."""
  directory = layout.checkpoint_dir(workdir, run.name)
  recorded = identity.read_existing(directory, f"checkpoints of run {run.name!r}")
  if recorded is not None:
    expected = shaping(config, run, recorded["shaping"].get("synthetic_set"), workdir)
    identity.compare(directory, recorded["shaping"], expected, f"run {run.name!r}",
                     "pass the settings it was trained with (its config.json), or retrain it")
