"""Every value derived from the config, worked out in one place: run names, set names and folders, sizes.

Jobs and inference ask these functions and never re-derive a value from raw settings, so two
modules cannot disagree on where a set lives, what a run is called or what size a segmenter
sees (vdm resolves its model section once the same way). Nothing here reads the workdir.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from satsynth_jax.infra import workdir as layout

CURATED_SUFFIX = "_curated"
METRIC_ENCODER = "metric_encoder"  # the metric encoder's run name


# ---- sizes ----

def segmenter_size(config) -> int:
  """The segmenter's input size: segmentation.image_size, or data.image_size when that is 0."""
  return config.segmentation.image_size or config.data.image_size


def synthetic_size(config) -> int:
  """The size of the pairs this config samples: sr.image_size through the cascade, else data.image_size."""
  return config.sr.image_size if config.sample.super_resolve else config.data.image_size


def pool_factor(config) -> int:
  """P: candidates sampled per pair a set keeps (curation.pool_factor when curation is on, else 1)."""
  return config.curation.pool_factor if config.curation.enabled else 1


# ---- the generator's runs ----

def conditioned(config) -> bool:
  """G takes class-presence vectors (diffusion.condition="presence"; never the image-only baseline)."""
  return config.diffusion.condition == "presence" and config.diffusion.joint_labels


def _ablation_suffix(config) -> str:
  f = config.diffusion
  parts = [f.prediction] if f.prediction != "eps" else []
  if not f.joint_labels:
    parts.append("image_only")
  elif config.data.label_encoding != "bits":
    parts.append(config.data.label_encoding)
  return "".join(f"_{part}" for part in parts)


def g_run(config) -> str:
  """G's run name: "diffusion" plus its ablation axes (x0, v, onehot, image_only) and "_presence"."""
  return "diffusion" + _ablation_suffix(config) + ("_presence" if conditioned(config) else "")


def sr_run(config) -> str:
  """G_SR's run name: "super_resolution" plus the same ablation axes as G (it is never presence-conditioned)."""
  return "super_resolution" + _ablation_suffix(config)


# ---- synthetic sets ----

def presence_plan_name(config) -> str:
  """The sampling plan's part of a set name: "" (unconditional), "real", "rare_w2" (guidance 2),
  "real-vehicle" (every pair also asks for vehicle), ..."""
  s = config.sample
  if not conditioned(config) or s.presence == "none":
    return ""
  name = s.presence + "".join("-" + re.sub(r"[^A-Za-z0-9.]", ".", c) for c in s.require_classes)
  return name + (f"_w{s.guidance:g}" if s.guidance else "")


def guidance(config) -> float:
  """The guidance scale sampling uses: sample.guidance for a conditional plan, 0 for an unconditional one
  (its condition is the null one, where guidance changes nothing but doubles the cost)."""
  return config.sample.guidance if presence_plan_name(config) else 0.0


def synthetic_set(config) -> str:
  """The name of the set `--mode=sample` writes: data.synthetic_dir's folder name when that is set, else
  G's run, its presence plan, and "_cascade" when G_SR upsamples it. Segmenter runs and score files
  are named after it."""
  if config.data.synthetic_dir:
    return pathlib.Path(config.data.synthetic_dir).name
  plan = presence_plan_name(config)
  return g_run(config) + (f"_{plan}" if plan else "") + ("_cascade" if config.sample.super_resolve else "")


def synthetic_dir(config, workdir) -> str | pathlib.Path:
  """Where that set lives: data.synthetic_dir as given (a local path or a bucket URL) when set, else
  <workdir>/synthetic/<synthetic_set>."""
  return config.data.synthetic_dir or layout.synthetic_dir(workdir, synthetic_set(config))


def curated_set(config) -> str:
  """The curated set's name: the sampled set's, plus "_curated"."""
  return synthetic_set(config) + CURATED_SUFFIX


def curated_dir(config, workdir) -> pathlib.Path:
  return layout.synthetic_dir(workdir, curated_set(config))


# ---- segmenter runs ----

BALANCED_FRACTION = 0.5  # the paper's batches, half real and half synthetic: run names say any other share


@dataclasses.dataclass(frozen=True)
class SegmenterRun:
  """One trained segmenter with its own checkpoint folder `name`: an experiment arm (real only, R = 0, or
  real + synthetic, R > 0) or the metric encoder. Training and inference both start from it, so no job
  forges a config.

  Names: "<architecture>_r0_s<seed>" on real data, "<architecture>_r<R>_<synthetic set>_s<seed>" with
  synthetic pairs, so arms trained on different sets (x0 or one-hot generators, a curated set) live
  side by side; "_mix<percent>" before the seed when synthetic pairs fill another share of each batch
  than the paper's half (data.synthetic_fraction); "metric_encoder" for the metric network.
  """
  name: str
  architecture: str
  synthetic_ratio: int
  seed: int
  synthetic_set: str | None = None  # the synthetic set's name when R > 0

  @classmethod
  def from_config(cls, config) -> "SegmenterRun":
    """The run `--mode=train_segmentation` / `--mode=evaluate` work on (data.synthetic_ratio, seed)."""
    return cls.arm(config, config.data.synthetic_ratio, config.seed, synthetic_set(config))

  @classmethod
  def arm(cls, config, synthetic_ratio: int, seed: int, synthetic_set: str | None) -> "SegmenterRun":
    """The segmenter run of one experiment arm (R, set) and seed."""
    architecture = config.segmentation.architecture
    if synthetic_ratio == 0:
      return cls(f"{architecture}_r0_s{seed}", architecture, 0, seed)
    fraction = config.data.synthetic_fraction
    mix = "" if fraction == BALANCED_FRACTION else f"_mix{100 * fraction:g}"
    return cls(f"{architecture}_r{synthetic_ratio}_{synthetic_set}{mix}_s{seed}", architecture, synthetic_ratio,
               seed, synthetic_set)

  @classmethod
  def metric_encoder(cls, config) -> "SegmenterRun":
    """The paper's ResNet-50 U-Net segmenter on real data only: the FID/sFID/IS feature network."""
    return cls(METRIC_ENCODER, "unet", 0, config.seed)


# The segmenters trained on real data only that judge synthetic pairs: curation.scorer scores a pool,
# sample_quality.encoder gives FID/sFID/IS features and label fidelity. real_only: the experiment's R=0 run
# of seed `seed` (nothing more to train); metric_encoder: the paper's own ResNet U-Net.
REAL_DATA_JUDGES = {"real_only": lambda config: SegmenterRun.arm(config, 0, config.seed, None),
                    "metric_encoder": SegmenterRun.metric_encoder}


def curation_scorer(config) -> SegmenterRun:
  """The run curation.scorer names: the experiment's R=0 run of seed `seed`, or the metric encoder."""
  return REAL_DATA_JUDGES[config.curation.scorer](config)


def sample_encoder(config) -> SegmenterRun:
  """The run sample_quality.encoder names: the metric encoder (the paper's), or the R=0 run of seed `seed`."""
  return REAL_DATA_JUDGES[config.sample_quality.encoder](config)


# ---- the experiment's arms ----

# experiment.arms: D u the unconditional set (D') or the class-presence conditioned one, as sampled
# or curated; D (real only) always runs.
ARM_KINDS = ("raw", "curated", "conditioned", "conditioned_curated")


def arm_ratios(config) -> tuple[int, ...]:
  """The R of each raw D u D' arm: experiment.ratios, or just sample.per_real."""
  return tuple(config.experiment.ratios) or (config.sample.per_real,)


def experiment_set(config, *, conditioned: bool):
  """The config that samples (and curates) one of the experiment's sets from its one G: the unconditional
  set (sample.presence none: the paper's D') or the conditioned one (experiment.presence's plan). Each is a
  pool (curation.enabled) exactly when one of experiment.arms curates it."""
  out = config.copy_and_resolve_references()
  kinds = config.experiment.arms
  with out.unlocked():
    out.sample.presence = config.experiment.presence if conditioned else "none"
    out.curation.enabled = ("conditioned_curated" if conditioned else "curated") in kinds
  return out
