"""Validate a config before any job starts, so a bad value fails in one line, not mid-run."""

from __future__ import annotations

from satsynth_jax import labels
from satsynth_jax.errors import SatSynthError

FORMATS = ("isaid", "loveda", "openearthmap", "folder", "demo")
DTYPES = ("float32", "bfloat16")


class ConfigError(SatSynthError, ValueError):
  """A config value no job can run with; the message names the key and the value."""


def _require(ok: bool, key: str, value, why: str):
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def validate(config) -> None:
  d = config.data
  k = d.num_classes
  _require(isinstance(k, int) and 2 <= k <= 65535, "data.num_classes", k, "must be an int in [2, 65535]")
  _require(d.format in FORMATS, "data.format", d.format, f"must be one of {FORMATS}")
  _require(len(d.class_names) == k, "data.class_names", d.class_names, f"needs {k} names (data.num_classes)")
  _require(len(d.palette) == k, "data.palette", d.palette, f"needs {k} RGB colours (data.num_classes)")
  for rgb in d.palette:
    _require(len(rgb) == 3 and all(0 <= int(v) <= 255 for v in rgb), "data.palette", rgb, "colours are 3 ints in [0, 255]")
  _require(len(set(map(tuple, d.palette))) == k or d.mask_format != "rgb", "data.palette", d.palette,
           "RGB masks need a distinct colour per class")
  no_data = 255 if k <= 255 else 65535  # what uint8 / uint16 mask records store
  _require(d.ignore_index == no_data, "data.ignore_index", d.ignore_index,
           f"records store no-data as {no_data} for {k} classes")
  _require(d.mask_format in ("index", "rgb"), "data.mask_format", d.mask_format, "must be 'index' or 'rgb'")
  _require(d.patch_size >= 8, "data.patch_size", d.patch_size, "must be >= 8")
  _require(d.patch_stride >= 0, "data.patch_stride", d.patch_stride, "must be >= 0 (0 means patch_size)")
  _require(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
  _require(d.examples_per_shard >= 1, "data.examples_per_shard", d.examples_per_shard, "must be >= 1")
  _require(d.resize in ("resize", "crop"), "data.resize", d.resize, "must be 'resize' or 'crop'")
  _require(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8")
  if d.resize == "crop":
    _require(d.patch_size >= d.image_size, "data.patch_size", d.patch_size,
             f"random crops need patches at least data.image_size={d.image_size}")
  _require(d.label_encoding in labels.ENCODINGS, "data.label_encoding", d.label_encoding,
           f"must be one of {labels.ENCODINGS}")
  _require(0 <= d.ignore_fill_class < k, "data.ignore_fill_class", d.ignore_fill_class, f"must be a class in [0, {k})")
  _require(config.dtype in DTYPES, "dtype", config.dtype, f"must be one of {DTYPES}")
  _require(d.synthetic_ratio >= 0, "data.synthetic_ratio", d.synthetic_ratio, "must be >= 0 (0: real data only)")
  _require(0.0 <= d.synthetic_fraction <= 1.0, "data.synthetic_fraction", d.synthetic_fraction, "must be in [0, 1]")
  _require(config.segmentation.model in ("fpn", "unet"), "segmentation.model", config.segmentation.model,
           "must be 'fpn' or 'unet'")
  if "model" in config:
    levels = len(config.model.ch_mult)
    factor = 2 ** (levels - 1)
    _require(d.image_size % factor == 0, "data.image_size", d.image_size,
             f"the U-Net halves it {levels - 1} times (model.ch_mult={tuple(config.model.ch_mult)}), "
             f"so it must be a multiple of {factor}")
