"""Every rule on every setting, checked before any job starts: a bad value fails in one line, not mid-run.

`validate(config)` checks values, enums and cross-field rules without starting JAX;
`validate_devices(config, device_count)` checks that every global batch splits over the
devices, once the (possibly multi-host) runtime is up. Library code trusts what passed here.
The allowed values come from the modules that act on them (samplers from diffusion/sampling.py,
architectures from models/, ...) and derived sizes from resolved.py; only main.py and the tests
import this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from satsynth_jax import labels, models, presence, resolved
from satsynth_jax.data import records, splits
from satsynth_jax.data.sources import FORMATS
from satsynth_jax.diffusion import guidance, sampling, schedule
from satsynth_jax.infra.errors import ConfigError
from satsynth_jax.metrics import curation
from satsynth_jax.models import unet
from satsynth_jax.train import optim


def _require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _in_range(key: str, value, low=None, high=None, *, integer: bool = True) -> None:
  kind = "an int" if integer else "a number"
  ok = _int(value) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool)
                                    and math.isfinite(value))
  if low is not None and high is not None:
    bounds = f"in [{low}, {high}]"
  else:
    bounds = f">= {low}" if low is not None else (f"<= {high}" if high is not None else "")
  _require(ok and (low is None or value >= low) and (high is None or value <= high), key, value,
           f"must be {kind}" + (f" {bounds}" if bounds else ""))


def _one_of(key: str, value, allowed: Sequence) -> None:
  _require(value in allowed, key, value, f"must be one of {tuple(allowed)}")


def _ints(key: str, value, low: int) -> None:
  _require(isinstance(value, (tuple, list)) and all(_int(v) and v >= low for v in value), key, value,
           f"must be a tuple of ints >= {low}")


def _data(d, mode: str | None) -> None:
  k = d.num_classes
  _in_range("data.num_classes", k, 2, 65535)
  _one_of("data.format", d.format, FORMATS)
  if mode == "prepare":  # the experiment asks only when its prepare stage still has to run (jobs/prepare.py)
    splits.require_source(d)
  _require(len(d.class_names) == k and len(set(d.class_names)) == k, "data.class_names", d.class_names,
           f"needs {k} distinct names (data.num_classes)")
  _require(len(d.palette) == k, "data.palette", d.palette, f"needs {k} RGB colours (data.num_classes)")
  for rgb in d.palette:
    _require(len(rgb) == 3 and all(_int(v) and 0 <= v <= 255 for v in rgb), "data.palette", rgb,
             "colours are 3 ints in [0, 255]")
  _one_of("data.mask_format", d.mask_format, ("index", "rgb"))
  _require(len(set(map(tuple, d.palette))) == k or d.mask_format != "rgb", "data.palette", d.palette,
           "RGB masks need a distinct colour per class")
  _require(d.ignore_index == records.ignore_value(k), "data.ignore_index", d.ignore_index,
           f"records store no-data as {records.ignore_value(k)} for {k} classes")
  _in_range("data.background_index", d.background_index, -1, k - 1)
  _in_range("data.label_offset", d.label_offset, -65535, 65535)
  _ints("data.ignore_raw_values", d.ignore_raw_values, 0)
  _in_range("data.max_image_pixels", d.max_image_pixels, 0)
  _in_range("data.patch_size", d.patch_size, 8)
  _in_range("data.patch_stride", d.patch_stride, 0)
  _in_range("data.val_fraction", d.val_fraction, 0.0, 0.99, integer=False)
  _in_range("data.test_fraction", d.test_fraction, 0.0, 0.99, integer=False)
  _require(d.val_fraction + d.test_fraction < 1, "data.test_fraction", d.test_fraction,
           f"with data.val_fraction={d.val_fraction} it would leave no train scene")
  _in_range("data.split_seed", d.split_seed, 0, 2**31 - 1)
  _in_range("data.examples_per_shard", d.examples_per_shard, 1)
  _one_of("data.resize", d.resize, ("resize", "crop"))
  _in_range("data.image_size", d.image_size, 8)
  if d.resize == "crop":
    _require(d.patch_size >= d.image_size, "data.patch_size", d.patch_size,
             f"random crops need patches at least data.image_size={d.image_size}")
  _require(isinstance(d.augment, bool), "data.augment", d.augment, "must be True or False")
  _one_of("data.label_encoding", d.label_encoding, labels.ENCODINGS)
  _require(isinstance(d.no_data_code, bool), "data.no_data_code", d.no_data_code, "must be True or False")
  _in_range("data.ignore_fill_class", d.ignore_fill_class, 0, k - 1)
  _in_range("data.max_no_data_fraction", d.max_no_data_fraction, 0.0, 1.0, integer=False)
  _in_range("data.read_threads", d.read_threads, 1, 256)
  _in_range("data.synthetic_ratio", d.synthetic_ratio, 0)
  _in_range("data.synthetic_fraction", d.synthetic_fraction, 0.0, 1.0, integer=False)
  if "demo_num_scenes" in d:
    _in_range("data.demo_num_scenes", d.demo_num_scenes, 1)
    _in_range("data.demo_scene_size", d.demo_scene_size, 16)
    _in_range("data.demo_seed", d.demo_seed, 0, 2**31 - 1)


def _train(key: str, t) -> None:
  _in_range(f"{key}.batch_size", t.batch_size, 1)
  _in_range(f"{key}.num_steps", t.num_steps, 1)
  _one_of(f"{key}.optimizer", t.optimizer, optim.OPTIMIZERS)
  _in_range(f"{key}.lr", t.lr, integer=False)
  _require(t.lr > 0, f"{key}.lr", t.lr, "must be > 0")
  _one_of(f"{key}.schedule", t.schedule, optim.SCHEDULES)
  _in_range(f"{key}.poly_power", t.poly_power, 0.0, integer=False)
  _in_range(f"{key}.weight_decay", t.weight_decay, 0.0, integer=False)
  _in_range(f"{key}.warmup_steps", t.warmup_steps, 0)
  _in_range(f"{key}.grad_clip", t.grad_clip, 0.0, integer=False)
  _in_range(f"{key}.ema_decay", t.ema_decay, 0.0, integer=False)
  _require(t.ema_decay < 1.0, f"{key}.ema_decay", t.ema_decay, "must be < 1 (0 disables EMA)")
  _in_range(f"{key}.log_every", t.log_every, 1)
  _in_range(f"{key}.checkpoint_every", t.checkpoint_every, 1)
  _in_range(f"{key}.keep_checkpoints", t.keep_checkpoints, 1)
  _in_range(f"{key}.sample_every", t.sample_every, 0)
  _in_range(f"{key}.num_grid_samples", t.num_grid_samples, 1)
  _in_range(f"{key}.grid_sampler_steps", t.grid_sampler_steps, 1)


def _unet(key: str, m, image_size: int, size_key: str) -> None:
  _in_range(f"{key}.ch", m.ch, 1)
  _ints(f"{key}.ch_mult", m.ch_mult, 1)
  _require(len(m.ch_mult) >= 1, f"{key}.ch_mult", m.ch_mult, "needs at least one level")
  for mult in m.ch_mult:
    _require(m.ch * mult % unet.NUM_GROUPS == 0, f"{key}.ch", m.ch,
             f"GroupNorm splits every width into {unet.NUM_GROUPS} groups, so ch x each of "
             f"{key}.ch_mult={tuple(m.ch_mult)} must be a multiple of {unet.NUM_GROUPS}")
  _in_range(f"{key}.num_res_blocks", m.num_res_blocks, 1)
  _ints(f"{key}.attn_resolutions", m.attn_resolutions, 1)
  _in_range(f"{key}.dropout", m.dropout, 0.0, 0.99, integer=False)
  _require(isinstance(m.scale_shift, bool), f"{key}.scale_shift", m.scale_shift, "must be True or False")
  _one_of(f"{key}.edge_padding", m.edge_padding, tuple(unet.EDGE_PADDINGS))
  factor = 2 ** (len(m.ch_mult) - 1)
  _require(image_size % factor == 0, size_key, image_size,
           f"the U-Net halves it {len(m.ch_mult) - 1} times ({key}.ch_mult={tuple(m.ch_mult)}), "
           f"so it must be a multiple of {factor}")


def validate(config, mode: str | None = None) -> None:
  """Raise ConfigError naming the first key whose value no job can run with."""
  _one_of("dtype", config.dtype, unet.COMPUTE_DTYPES)
  _in_range("seed", config.seed, 0, 2**31 - 1)
  d = config.data
  _data(d, mode)

  f = config.diffusion
  _in_range("diffusion.timesteps", f.timesteps, 1)
  _in_range("diffusion.beta_start", f.beta_start, 0.0, 1.0, integer=False)
  _in_range("diffusion.beta_end", f.beta_end, 0.0, 1.0, integer=False)
  _require(0 < f.beta_start <= f.beta_end < 1, "diffusion.beta_end", f.beta_end,
           f"needs 0 < diffusion.beta_start={f.beta_start} <= beta_end < 1")
  _one_of("diffusion.prediction", f.prediction, schedule.PREDICTIONS)
  _require(isinstance(f.joint_labels, bool), "diffusion.joint_labels", f.joint_labels, "must be True or False")
  _require(isinstance(f.self_condition, bool), "diffusion.self_condition", f.self_condition, "must be True or False")
  _one_of("diffusion.loss_weighting", f.loss_weighting, schedule.LOSS_WEIGHTINGS)
  _in_range("diffusion.class_weight_power", f.class_weight_power, 0.0, 2.0, integer=False)
  _in_range("diffusion.min_snr_gamma", f.min_snr_gamma, integer=False)
  _require(f.min_snr_gamma > 0, "diffusion.min_snr_gamma", f.min_snr_gamma, "must be > 0")
  _one_of("diffusion.condition", f.condition, guidance.CONDITIONS)
  _in_range("diffusion.condition_dropout", f.condition_dropout, 0.0, 0.99, integer=False)
  _unet("diffusion.model", f.model, d.image_size, "data.image_size")
  _train("diffusion.train", f.train)

  s = config.sample
  _in_range("sample.per_real", s.per_real, 0)
  _one_of("sample.sampler", s.sampler, sampling.SAMPLERS)
  _in_range("sample.ddim_steps", s.ddim_steps, 1, f.timesteps)
  _in_range("sample.ddim_eta", s.ddim_eta, 0.0, integer=False)
  _in_range("sample.batch_size", s.batch_size, 1)
  _in_range("sample.checkpoint_step", s.checkpoint_step, -1)
  _in_range("sample.examples_per_shard", s.examples_per_shard, 1)
  _require(isinstance(s.super_resolve, bool), "sample.super_resolve", s.super_resolve, "must be True or False")
  _in_range("sample.sr_checkpoint_step", s.sr_checkpoint_step, -1)
  _one_of("sample.presence", s.presence, presence.PLANS)
  _require(isinstance(s.require_classes, (tuple, list)) and all(c in d.class_names for c in s.require_classes),
           "sample.require_classes", s.require_classes, f"must be a tuple of class names from {tuple(d.class_names)}")
  _in_range("sample.guidance", s.guidance, 0.0, integer=False)
  _require(s.presence == "none" or f.condition == "presence", "sample.presence", s.presence,
           "asks a class-presence conditioned G for classes: set diffusion.condition=presence (and train it)")
  _require(s.presence == "none" or f.condition_dropout > 0 or s.guidance == 0, "sample.guidance", s.guidance,
           "guidance needs the unconditional model that diffusion.condition_dropout > 0 trains")
  _require(not s.require_classes or s.presence != "none", "sample.require_classes", s.require_classes,
           "needs a presence plan: set sample.presence=real or rare")

  r = config.sr
  _in_range("sr.image_size", r.image_size, 16)
  if mode in ("train_sr",) or s.super_resolve:
    _require(r.image_size > d.image_size and r.image_size % d.image_size == 0, "sr.image_size", r.image_size,
             f"must be a multiple (>= 2x) of data.image_size={d.image_size}")
    _unet("sr.model", r.model, r.image_size, "sr.image_size")
  _train("sr.train", r.train)

  g = config.segmentation
  _one_of("segmentation.architecture", g.architecture, tuple(models.SEGMENTERS))
  _require(g.image_size == 0 or (_int(g.image_size) and g.image_size >= 8), "segmentation.image_size", g.image_size,
           "must be 0 (data.image_size) or an int >= 8")
  _require(isinstance(g.resize_synthetic, bool), "segmentation.resize_synthetic", g.resize_synthetic,
           "must be True or False")
  _require(not g.pretrained_path or str(g.pretrained_path).endswith(".safetensors"), "segmentation.pretrained_path",
           g.pretrained_path, "must be a .safetensors file of torchvision ResNet-50 weights (README)")
  _require(_int(g.base_width) and g.base_width >= 8 and g.base_width % 8 == 0, "segmentation.base_width",
           g.base_width, "must be a multiple of 8 (64: ResNet-50)")
  _require(not g.pretrained_path or g.base_width == 64, "segmentation.base_width", g.base_width,
           "ImageNet weights (segmentation.pretrained_path) fit only ResNet-50's widths: set it to 64")
  _require(isinstance(g.backbone_stages, (tuple, list)) and len(g.backbone_stages) == 4
           and all(_int(n) and n >= 1 for n in g.backbone_stages), "segmentation.backbone_stages",
           g.backbone_stages, "must be 4 ints >= 1 (ResNet-50: (3, 4, 6, 3))")
  _train("segmentation.train", g.train)
  _in_range("segmentation.eval_batch_size", g.eval_batch_size, 1)
  _in_range("segmentation.eval_every", g.eval_every, 0)

  e = config.experiment
  _require(isinstance(e.image_only_baseline, bool), "experiment.image_only_baseline", e.image_only_baseline,
           "must be True or False")
  _in_range("experiment.seeds", e.seeds, 1)
  _in_range("experiment.flat_within", e.flat_within, 0.0, 1.0, integer=False)
  _require(isinstance(e.arms, (tuple, list)) and len(e.arms) >= 1 and len(set(e.arms)) == len(e.arms)
           and all(kind in resolved.ARM_KINDS for kind in e.arms), "experiment.arms", e.arms,
           f"must be distinct arms from {resolved.ARM_KINDS} (D, real only, always runs)")
  _one_of("experiment.presence", e.presence, presence.PLANS[1:])
  _require(isinstance(e.ratios, (tuple, list)) and all(_int(r) and 1 <= r <= s.per_real for r in e.ratios)
           and len(set(e.ratios)) == len(e.ratios), "experiment.ratios", e.ratios,
           f"must be distinct ints in [1, sample.per_real={s.per_real}] (the set's first R x |D| pairs)")
  if mode == "experiment":  # what the arms need binds only the job that runs them
    conditioned_arms = [kind for kind in e.arms if kind.startswith("conditioned")]
    _require(not conditioned_arms or f.condition == "presence", "experiment.arms", e.arms,
             f"{conditioned_arms} need a class-presence conditioned G: set diffusion.condition=presence")
    _require(not d.synthetic_dir or not conditioned_arms or len(conditioned_arms) == len(e.arms),
             "data.synthetic_dir", d.synthetic_dir,
             f"names one folder, but experiment.arms={tuple(e.arms)} samples an unconditional and a conditioned set; "
             "leave it unset (the sets go under the workdir) or keep arms of one kind")
    _require(not d.synthetic_dir or not e.image_only_baseline, "data.synthetic_dir", d.synthetic_dir,
             "names one folder, but experiment.image_only_baseline=True samples a second set (the image-only G's); "
             "leave it unset (the sets go under the workdir)")
    _require(config.curation.enabled or not any(kind.endswith("curated") for kind in e.arms), "curation.enabled",
             config.curation.enabled, f"is False but experiment.arms={tuple(e.arms)} curates: drop the curated arms")
    _require(s.per_real >= 1, "sample.per_real", s.per_real, "the experiment compares D with D u D', so R >= 1")
    synthetic_size = resolved.synthetic_size(config)
    _require(resolved.segmenter_size(config) == synthetic_size or g.resize_synthetic, "segmentation.image_size",
             g.image_size,
             f"the experiment's synthetic pairs are {synthetic_size} px "
             f"({'sr.image_size' if s.super_resolve else 'data.image_size'}); set segmentation.image_size="
             f"{synthetic_size} or segmentation.resize_synthetic=True")
  if mode in ("train_segmentation", "evaluate") and d.synthetic_ratio > 0:
    _require(d.synthetic_fraction > 0, "data.synthetic_fraction", d.synthetic_fraction,
             f"must be > 0 when data.synthetic_ratio={d.synthetic_ratio} mixes synthetic pairs in")
  _one_of("sample_quality.encoder", config.sample_quality.encoder, tuple(resolved.REAL_DATA_JUDGES))
  _curation(config, mode)


# ---- curation (jobs/curate.py): the stage between sampling and segmenter training ----
def _curation(config, mode: str | None = None) -> None:
  """curation.*; for --mode=curate (and the experiment with curation.enabled) the pool must be scorable whole."""
  u, d, s = config.curation, config.data, config.sample
  _require(isinstance(u.enabled, bool), "curation.enabled", u.enabled, "must be True or False")
  _in_range("curation.pool_factor", u.pool_factor, 1)
  _one_of("curation.scorer", u.scorer, tuple(resolved.REAL_DATA_JUDGES))
  _in_range("curation.pixel_tolerance", u.pixel_tolerance, 0.0, integer=False)
  _in_range("curation.min_fidelity", u.min_fidelity, 0.0, 1.0, integer=False)
  _one_of("curation.selection", u.selection, curation.SELECTIONS)
  if mode == "curate" or (mode == "experiment" and u.enabled):
    _require(s.per_real >= 1, "sample.per_real", s.per_real, "curation keeps R x |D| pairs, so R >= 1")
    pool_size, seen = resolved.synthetic_size(config), resolved.segmenter_size(config)
    # A centre crop would leave the rest of each pair unscored; a resize maps the verdict back.
    _require(d.resize == "resize" or seen == pool_size, "data.resize", d.resize,
             f"curation scores whole pairs, but crops of {seen} px from the {pool_size} px pool would leave "
             f"pixels unscored; set data.resize=resize or segmentation.image_size={pool_size}")
# ---- end of curation ----


def validate_devices(config, device_count: int) -> None:
  """Every global batch must split evenly over the devices of all processes."""
  for key, value in (("diffusion.train.batch_size", config.diffusion.train.batch_size),
                     ("sr.train.batch_size", config.sr.train.batch_size),
                     ("sample.batch_size", config.sample.batch_size),
                     ("segmentation.train.batch_size", config.segmentation.train.batch_size),
                     ("segmentation.eval_batch_size", config.segmentation.eval_batch_size)):
    _require(value % device_count == 0, key, value,
             f"is not divisible by the {device_count} devices; use a multiple of {device_count}")
