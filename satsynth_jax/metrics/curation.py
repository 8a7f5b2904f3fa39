"""Curation's maths (jobs/curate.py runs it): per-pixel losses, class statistics, filters, weights, selection.

Pure functions of arrays: the scorer's losses and argmax come in (segmenter.scored_batches), a
keep-mask per pair, per-class thresholds and weights and the chosen pairs go out. The rules
(FreeMask-style class-wise thresholds from real train pairs, class-balanced label fidelity,
hard-and-rare weighted selection) are documented in jobs/curate.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

SELECTIONS = ("hard_rare", "uniform")  # curation.selection
Scored = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # (record indices, loss, argmax, mask) of a batch
# Float32 losses compared with float64 statistics: equal losses must never fall above their own mean.
_SLACK = 1e-6
_SELECTION_STREAM = 0xC0A7E  # seed stream of the selection, apart from any other use of `seed`


def pixel_losses(logits: jax.Array, mask: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy of `logits` [..., H, W, K] against `mask` [..., H, W], 0 where unlabelled; argmax)."""
  labelled = mask != ignore_index
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(labelled, mask, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(labelled, -picked, 0.0), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def class_loss_moments(loss: np.ndarray, mask: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
  """float64 [3, K]: per generated class, (pixel count, sum of losses, sum of squared losses)."""
  labelled = np.asarray(mask) != ignore_index
  classes = np.asarray(mask)[labelled].astype(np.intp)
  values = np.asarray(loss, np.float64)[labelled]
  return np.stack([np.bincount(classes, minlength=num_classes).astype(np.float64),
                   np.bincount(classes, weights=values, minlength=num_classes),
                   np.bincount(classes, weights=values * values, minlength=num_classes)])


def class_mean_loss(moments: np.ndarray) -> np.ndarray:
  """Mean loss per class from class_loss_moments; NaN for a class without pixels."""
  count, total, _ = moments
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def class_thresholds(moments: np.ndarray, tolerance: float) -> np.ndarray:
  """threshold_c = mean_c + tolerance x std_c over the class's pixels; +inf for a class without pixels."""
  count, total, squares = moments
  safe = np.maximum(count, 1)
  mean = total / safe
  std = np.sqrt(np.maximum(squares / safe - mean * mean, 0.0))
  threshold = mean + tolerance * std
  threshold = threshold + _SLACK * (np.abs(threshold) + 1.0)
  return np.where(count > 0, threshold, np.inf)


def keep_mask(loss: np.ndarray, mask: np.ndarray, thresholds: np.ndarray, ignore_index: int) -> np.ndarray:
  """bool, True where the pixel is labelled and its loss is at most its generated class's threshold."""
  mask = np.asarray(mask)
  labelled = mask != ignore_index
  limit = np.asarray(thresholds, np.float64)[np.where(labelled, mask, 0).astype(np.intp)]
  return labelled & (np.asarray(loss, np.float64) <= limit)


def label_fidelity(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Per pair [B]: the mean, over the classes `mask` [B, H, W] holds, of the fraction of that class's pixels
  where `pred` agrees (class-balanced recall); NaN for a pair without labelled pixels (no-data: values >= K)."""
  mask, pred = np.asarray(mask), np.asarray(pred)
  classes = np.arange(num_classes)[:, None, None, None]  # [K, 1, 1, 1] against [B, H, W]
  of_class = mask[None] == classes
  count = of_class.sum(axis=(2, 3))  # [K, B]
  agree = (of_class & (pred[None] == classes)).sum(axis=(2, 3))
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.where(count > 0, agree / np.maximum(count, 1), np.nan)
    return np.nanmean(recall, axis=0) if recall.size else np.full(mask.shape[0], np.nan)


def resize_nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """[h, w] -> shape by the nearest pixel at the same pixel centres (the pipeline's mask rule)."""
  height, width = array.shape
  rows = ((np.arange(shape[0]) + 0.5) * (height / shape[0])).astype(np.intp)
  cols = ((np.arange(shape[1]) + 0.5) * (width / shape[1])).astype(np.intp)
  return array[rows[:, None], cols[None, :]]


def filtered_mask(mask: np.ndarray, keep: np.ndarray, ignore_index: int) -> np.ndarray:
  """The record's mask with every pixel not kept set to no-data; `keep` at any size (mapped back)."""
  if keep.shape != mask.shape:
    keep = resize_nearest(keep, mask.shape)
  return np.where(keep, mask, ignore_index).astype(mask.dtype)


def class_weights(class_loss: np.ndarray, class_pixels: np.ndarray) -> np.ndarray:
  """w_c ∝ hardness_c / sqrt(pixel frequency_c), summing to 1; 0 for a class the train split lacks."""
  pixels = np.asarray(class_pixels, np.float64)
  present = pixels > 0
  frequency = pixels / max(pixels.sum(), 1.0)
  hardness = np.nan_to_num(np.asarray(class_loss, np.float64), nan=0.0)
  weights = np.where(present, hardness / np.sqrt(np.where(present, frequency, 1.0)), 0.0)
  if weights.sum() <= 0:  # a perfect scorer: rarity alone
    weights = np.where(present, 1.0 / np.sqrt(np.where(present, frequency, 1.0)), 0.0)
  return weights / weights.sum()


def pair_scores(kept_class_pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Per pair: sum_c w_c x kept_c / kept, the class-weighted share of its kept pixels."""
  kept = np.asarray(kept_class_pixels, np.float64)
  return kept @ np.asarray(weights, np.float64) / np.maximum(kept.sum(axis=1), 1.0)


def select(candidates: np.ndarray, count: int, selection: str, scores: np.ndarray | None, seed: int) -> np.ndarray:
  """`count` of `candidates` without replacement, sorted; uniform or with probability ∝ `scores`.

  Weighted: Efraimidis-Spirakis keys log(u) / score, the largest taken (the same law as drawing
  one at a time in proportion to score); zero-score candidates come last, in random order.
  """
  candidates = np.asarray(candidates)
  if count > len(candidates):
    raise ValueError(f"cannot select {count} of {len(candidates)} candidates")
  rng = np.random.default_rng([seed, _SELECTION_STREAM])
  if selection == "uniform":
    return np.sort(rng.choice(candidates, size=count, replace=False))
  if selection != "hard_rare":
    raise ValueError(f"selection {selection!r} is not one of {SELECTIONS}")
  scores = np.asarray(scores, np.float64)
  u = rng.random(len(candidates))
  with np.errstate(divide="ignore"):
    keys = np.where(scores > 0, np.log(u) / np.where(scores > 0, scores, 1.0), -np.inf)
  order = np.lexsort((-u, -keys))  # keys descending, then u
  return np.sort(candidates[order[:count]])


def pool_statistics(batches: Iterable[Scored], num_pool: int, num_classes: int,
                    ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
  """(class loss moments [3, K], label fidelity per pair [N]) of a record folder from one scoring pass."""
  moments = np.zeros((3, num_classes))
  fidelity = np.full(num_pool, np.nan)
  for index, loss, pred, mask in batches:
    moments += class_loss_moments(loss, mask, num_classes, ignore_index)
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a pair without labels: NaN, as documented
      fidelity[index] = label_fidelity(pred, mask, num_classes)
  return moments, fidelity


def pool_filter(batches: Iterable[Scored], num_pool: int, num_classes: int, ignore_index: int, thresholds: np.ndarray,
                wanted: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray], int, int]:
  """(kept pixels per pair and class [N, K], packed keep-masks of the `wanted` pairs, labelled and
  ignored pixels over the pool) from a second scoring pass, at the scorer's size."""
  kept_class_pixels = np.zeros((num_pool, num_classes), np.int64)
  keeps, labelled, ignored = {}, 0, 0
  for index, loss, _, mask in batches:
    keep = keep_mask(loss, mask, thresholds, ignore_index)
    has_label = mask != ignore_index
    labelled += int(has_label.sum())
    ignored += int((has_label & ~keep).sum())
    for i, row_keep, row_mask in zip(index, keep, mask):
      kept_class_pixels[i] = np.bincount(row_mask[row_keep], minlength=num_classes)
      if wanted[i]:
        keeps[int(i)] = np.packbits(row_keep)
  return kept_class_pixels, keeps, labelled, ignored
