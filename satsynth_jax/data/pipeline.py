"""grain input pipelines: record pairs -> model-size, augmented, per-process numpy batches.

Public API (`batch_size` is always the batch of one JAX process; record folders are local
paths or bucket URLs such as gs://bucket/records/train, read through records.as_path):

  pairs(source, config, *, seed, train, process_index=None, process_count=None) -> grain.MapDataset
      This process's decoded pairs at model size S = config.data.image_size:
      {"image": uint8[S, S, 3], "mask": uint8|uint16[S, S], "id": str}.
      train: endless, reshuffled every epoch, random crop (data.resize == "crop") and a random
      flip/rot90 (data.augment) applied identically to image and mask.
      eval: one ordered pass, centre crop or resize, no augmentation.
  mix(real, synthetic, synthetic_fraction) -> grain.MapDataset
      Endless interleaving of both inputs at the ratio, each example tagged "is_synthetic".
      Both inputs repeat, so the smaller set (usually the real one) is oversampled, as in the
      paper, which keeps real and synthetic balanced.
  diffusion_batches(config, record_dir, *, batch_size, seed, presence=False, ...) -> grain.IterDataset
      Endless {"x": float32[B, S, S, 3 + C] in [-1, 1]}: the image and the label code
      (labels.encode_real_pair, data.label_encoding); no-data pixels get their own code
      (data.no_data_code) or become data.ignore_fill_class. With `presence`, also
      "presence": float32[B, K], the classes each (augmented) mask holds (labels.presence).
  segmentation_batches(config, real_dir, synthetic_dir=None, *, batch_size, seed, train,
                       synthetic_fraction=0.5, synthetic_count=None, ...) -> grain.IterDataset
      At S = segmentation.image_size: {"image": float32[B, S, S, 3] in [0, 1], "mask": int32[B, S, S] (data.ignore_index kept),
      "is_synthetic": bool[B]}. train: endless, real mixed with synthetic_dir (if any; only its
      first synthetic_count pairs when given). eval: one ordered pass
      over real_dir plus "valid": bool[B]; the last batch is padded (valid=False, mask all
      ignore_index) so that every process yields the same number of batches and each example
      is seen exactly once over all processes.

Sharding: in training every process builds the same seeded global order (a fresh permutation
per epoch) and takes the positions p, p + n, p + 2n, ... of it (p = process_index,
n = process_count). The datasets are lazy, so a process decodes only its own positions; within
each epoch the processes' shares are disjoint and together cover the data. Evaluation gives
process p the records p, p + n, ... in order.

Resizing: images are area-averaged when shrinking (PIL BOX) and bilinear when enlarging;
masks take the nearest source pixel at the same pixel centres, so labels stay crisp and
valid. In "crop" mode evaluation uses the central crop.

Determinism and resumption: a seed fixes the order and every augmentation (grain seeds each
element's generator from the seed and the element's global index). Iterators from these
datasets checkpoint mid-epoch with `it.get_state()` / `it.set_state(state)`, or inside an orbax
step with `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from satsynth_jax import labels, resolved
from satsynth_jax.data import records
from satsynth_jax.infra.errors import SatSynthError

Example = dict[str, Any]


class PipelineError(SatSynthError, ValueError):
  """Records that cannot feed this config (classes, sizes, counts); the message names the folder."""

# Each record folder a pipeline reads keeps up to this many bytes of decoded pairs (records.PairSource):
# small splits, read once per epoch for hundreds of epochs, are decoded once.
DECODED_CACHE_BYTES = 256 << 20

# Seed streams, so the real and synthetic pipelines never share a permutation.
_REAL_STREAM, _SYNTHETIC_STREAM = 0, 1


def pairs(
    source: Sequence[Example],
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    train: bool,
    process_index: int | None = None,
    process_count: int | None = None,
    size: int | None = None,
) -> grain.MapDataset:
  """Decoded pairs of this process at `size` (default data.image_size); endless and augmented when `train`."""
  process_index, process_count = _process_shard(process_index, process_count)
  d = config.data
  size = size or d.image_size
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise PipelineError(f"{source!r} holds no examples")
  if train:
    view = functools.partial(_train_view, size=size, mode=d.resize, augment=d.augment)
    # Augment before slicing: each element's generator is seeded by its *global* index, so
    # processes with the same seed do not draw identical flips and crops.
    ds = ds.seed(seed).shuffle().repeat().random_map(view)
  else:
    ds = ds.map(functools.partial(_eval_view, size=size, mode=d.resize))
  return ds[process_index::process_count]


def mix(real: grain.MapDataset, synthetic: grain.MapDataset, synthetic_fraction: float) -> grain.MapDataset:
  """Endless stream with `synthetic_fraction` of synthetic examples, tagged "is_synthetic".

  grain interleaves at the exact ratio rather than by coin flips, so every window of the stream
  (every batch) holds the ratio up to rounding; finite inputs are repeated.
  """
  if not 0.0 <= synthetic_fraction <= 1.0:
    raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
  real = _endless(real).map(functools.partial(_tag, is_synthetic=False))
  synthetic = _endless(synthetic).map(functools.partial(_tag, is_synthetic=True))
  if synthetic_fraction == 0.0:
    return real
  if synthetic_fraction == 1.0:
    return synthetic
  return grain.MapDataset.mix([real, synthetic], weights=[1.0 - synthetic_fraction, synthetic_fraction])


def diffusion_batches(
    config: ml_collections.ConfigDict,
    record_dir: str | os.PathLike,
    *,
    batch_size: int,
    seed: int,
    presence: bool = False,
    class_weights: np.ndarray | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
  """Endless training batches {"x": float32[B, S, S, 3 + C] in [-1, 1][, "presence"][, "weights"]} for the
  diffusion model; `class_weights` [K] give each pixel's loss weight by its class ("weights" [B, S, S]; no-data 1)."""
  d = config.data
  ds = pairs(open_records(record_dir, config), config, seed=seed, train=True,
             process_index=process_index, process_count=process_count)
  # Once, not per example: the class weights, then no-data's weight of 1.
  table = None if class_weights is None else np.append(np.asarray(class_weights, np.float32), np.float32(1.0))
  ds = ds.map(functools.partial(_diffusion_example, num_classes=d.num_classes, encoding=d.label_encoding,
                                ignore_index=d.ignore_index, no_data_code=d.no_data_code,
                                fill_class=d.ignore_fill_class, presence=presence, weight_table=table))
  return _batched(ds, config, batch_size)


def segmentation_batches(
    config: ml_collections.ConfigDict,
    real_dir: str | os.PathLike,
    synthetic_dir: str | os.PathLike | None = None,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    synthetic_fraction: float = 0.5,
    synthetic_count: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
  """Segmenter batches: endless real + synthetic mix (train) or one padded pass over real_dir (eval).

  Without a synthetic_dir training reads real data only (the paper's "D" baseline). Pairs
  reach the segmenter at segmentation.image_size.
  """
  process_index, process_count = _process_shard(process_index, process_count)
  shard = dict(process_index=process_index, process_count=process_count)
  size = resolved.segmenter_size(config)
  real = open_records(real_dir, config)
  if not train:
    if synthetic_dir is not None:
      raise ValueError(f"evaluation reads real data only; got synthetic_dir={synthetic_dir!s}")
    ds = pairs(real, config, seed=seed, train=False, size=size, **shard)
    ds = ds.map(functools.partial(_tag, is_synthetic=False)).map(_segmentation_example)
    return _batched(_pad_to_full_batches(ds, config, batch_size, len(real), process_count), config, batch_size)

  real_ds = pairs(real, config, seed=_stream_seed(seed, _REAL_STREAM), train=True, size=size, **shard)
  if synthetic_dir is None:
    ds = real_ds.map(functools.partial(_tag, is_synthetic=False))
  else:
    synthetic = open_records(synthetic_dir, config)
    if synthetic_count is not None:  # a prefix: a run asking for fewer pairs uses a subset of the same ones
      if not 0 < synthetic_count <= len(synthetic):
        raise PipelineError(f"synthetic_count={synthetic_count}: {synthetic_dir} holds {len(synthetic)} pairs")
      synthetic = grain.MapDataset.source(synthetic)[:synthetic_count]
    synthetic_ds = pairs(synthetic, config, seed=_stream_seed(seed, _SYNTHETIC_STREAM), train=True, size=size,
                         **shard)
    # Mixing after sharding keeps the ratio on every process (a strided slice of an
    # interleaved stream could hand one process only real and another only synthetic data).
    ds = mix(real_ds, synthetic_ds, synthetic_fraction)
  return _batched(ds.map(_segmentation_example), config, batch_size)


# ---- per-example transforms (module-level so grain can pickle them for worker processes) ----


def _train_view(example: Example, rng: np.random.Generator, *, size: int, mode: str, augment: bool) -> Example:
  image, mask = _fit(example, size, mode, rng)
  if augment:
    image, mask = _dihedral(image, mask, rng)
  return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask), "id": example["id"]}


def _eval_view(example: Example, *, size: int, mode: str) -> Example:
  image, mask = _fit(example, size, mode, rng=None)
  return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask), "id": example["id"]}


def _fit(example: Example, size: int, mode: str, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
  """Random crop (rng given) or central crop, or resize, of the pair to size x size."""
  image, mask = example["image"], example["mask"]
  if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
    raise ValueError(f"example {example['id']!r}: expected image [H, W, 3] and mask [H, W], "
                     f"got {image.shape} and {mask.shape}")
  height, width = mask.shape
  if mode == "crop":
    if height < size or width < size:
      raise PipelineError(f"example {example['id']!r}: {height}x{width} pair is smaller than the "
                       f"{size}x{size} crop (config.data.image_size)")
    if rng is None:
      top, left = (height - size) // 2, (width - size) // 2
    else:
      top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    return image[top:top + size, left:left + size], mask[top:top + size, left:left + size]
  if (height, width) == (size, size):
    return image, mask
  shrinking = height * width > size * size
  resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
  resized = np.asarray(Image.fromarray(image).resize((size, size), resample))
  # Nearest neighbour at the output pixel centres, which is where BOX/BILINEAR sample too.
  rows = ((np.arange(size) + 0.5) * (height / size)).astype(np.intp)
  cols = ((np.arange(size) + 0.5) * (width / size)).astype(np.intp)
  return resized, mask[rows[:, None], cols[None, :]]


def _dihedral(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One of the 8 flips/rotations, the same for image and mask (aerial views have no 'up')."""
  turns, flip = int(rng.integers(4)), bool(rng.integers(2))
  image, mask = np.rot90(image, turns, axes=(0, 1)), np.rot90(mask, turns, axes=(0, 1))
  if flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  return image, mask


def _tag(example: Example, *, is_synthetic: bool) -> Example:
  return {**example, "is_synthetic": is_synthetic}


def _diffusion_example(example: Example, *, num_classes: int, encoding: str, ignore_index: int, no_data_code: bool,
                       fill_class: int, presence: bool = False, weight_table: np.ndarray | None = None) -> Example:
  joint = labels.encode_real_pair(example["image"], example["mask"], num_classes, encoding, ignore_index=ignore_index,
                                  no_data_code=no_data_code, fill_class=fill_class)
  out = {"x": joint.astype(np.float32, copy=False)}
  if presence:
    out["presence"] = labels.presence(example["mask"], num_classes)
  if weight_table is not None:  # [K + 1]: each class's loss weight, then no-data's
    out["weights"] = weight_table[np.minimum(example["mask"], num_classes)]
  return out


def _segmentation_example(example: Example) -> Example:
  return {
      "image": example["image"].astype(np.float32) / np.float32(255.0),
      "mask": example["mask"].astype(np.int32),
      "is_synthetic": np.bool_(example["is_synthetic"]),
  }


# ---- assembly helpers ----


def open_records(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> records.PairSource:
  """The record directory's pairs, after checking they carry the classes the config expects."""
  source = records.PairSource(directory, cache_bytes=DECODED_CACHE_BYTES)
  d = config.data
  if source.num_classes != d.num_classes:
    raise PipelineError(f"{directory}: records have num_classes={source.num_classes}, "
                     f"but config.data.num_classes={d.num_classes}")
  # Records mark no-data with a value fixed by K; the model code knows only the config's.
  if records.ignore_value(d.num_classes) != d.ignore_index:
    raise PipelineError(f"{directory}: records mark no-data pixels with {records.ignore_value(d.num_classes)}, "
                     f"but config.data.ignore_index={d.ignore_index}")
  return source


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return process_index, process_count


def _stream_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _endless(ds: grain.MapDataset) -> grain.MapDataset:
  return ds if len(ds) == sys.maxsize else ds.repeat()


def _pad_to_full_batches(ds: grain.MapDataset, config: ml_collections.ConfigDict, batch_size: int,
                         num_examples: int, process_count: int) -> grain.MapDataset:
  """Marks examples valid and appends invalid fillers up to the batch count every process shares."""
  per_process = -(-num_examples // process_count)
  target = -(-per_process // batch_size) * batch_size
  size = resolved.segmenter_size(config)
  filler = {
      "image": np.zeros((size, size, 3), np.float32),
      "mask": np.full((size, size), config.data.ignore_index, np.int32),
      "is_synthetic": np.bool_(False),
      "valid": np.bool_(False),
  }
  ds = ds.map(_mark_valid)
  if target == len(ds):
    return ds
  return grain.MapDataset.concatenate([ds, grain.MapDataset.source([filler] * (target - len(ds)))])


def _mark_valid(example: Example) -> Example:
  return {**example, "valid": np.bool_(True)}


def _batched(ds: grain.MapDataset, config: ml_collections.ConfigDict, batch_size: int) -> grain.IterDataset:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  # Elements are decoded in read_threads threads; two batches of them are kept in flight.
  options = grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=2 * batch_size)
  return ds.to_iter_dataset(options).batch(batch_size, drop_remainder=True)
