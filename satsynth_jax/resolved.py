"""Every value derived from the config, worked out in one place: run names, set names and folders, sizes.

Jobs and inference ask these functions and never re-derive a value from raw settings, so two
modules cannot disagree on where a set lives or what size a segmenter sees (vdm resolves its
model section once the same way).
"""

from __future__ import annotations

import pathlib
import re

from satsynth_jax import workdir as layout

CURATED_SUFFIX = "_curated"


def segmenter_size(config) -> int:
  """The segmenter's input size: segmentation.image_size, or data.image_size when that is 0."""
  return config.segmentation.image_size or config.data.image_size


def synthetic_size(config) -> int:
  """The size of the pairs this config samples: sr.image_size through the cascade, else data.image_size."""
  return config.sr.image_size if config.sample.super_resolve else config.data.image_size


def pool_factor(config) -> int:
  """P: candidates sampled per pair a set keeps (curation.pool_factor when curation is on, else 1)."""
  return config.curation.pool_factor if config.curation.enabled else 1


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


def presence_plan_name(config) -> str:
  """The sampling plan's part of a set name: "" (unconditional), "real", "rare_w2" (guidance 2),
  "real-vehicle" (every pair also asks for vehicle), ..."""
  s = config.sample
  if not conditioned(config) or s.presence == "none":
    return ""
  name = s.presence + "".join("-" + re.sub(r"[^A-Za-z0-9.]", ".", c) for c in s.require_classes)
  return name + (f"_w{s.guidance:g}" if s.guidance else "")


def synthetic_set(config) -> str:
  """The set `--mode=sample` writes: G's run, its presence plan, and "_cascade" when G_SR upsamples it."""
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
