"""Segmentation scores: a jit-able confusion matrix, then per-class IoU / F1 and their means.

Evaluation accumulates one [K, K] matrix over the whole split (per-batch matrices from
`confusion_matrix`, summed on the host in int64) and scores it once, so the means are over
classes of the dataset-level IoU/F1, as mIoU is usually reported, not over batches.

Scores are fractions in [0, 1]. A class with no pixel in the labels and none in the
predictions has an undefined IoU/F1 (0/0): it is NaN and left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit(static_argnames=("num_classes", "ignore_index"))
def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int,
                     ignore_index: int = 255) -> jax.Array:
  """Pixel counts [K, K] int32: entry (i, j) counts pixels of true class i predicted as j.

  `labels` and `preds` are integer maps of the same shape. Pixels whose label is
  `ignore_index`, or whose label or prediction lies outside [0, K), are not counted. int32
  counts are exact per batch; sum batches in int64 (`accumulate`).
  """
  labels = jnp.asarray(labels).astype(jnp.int32).ravel()
  preds = jnp.asarray(preds).astype(jnp.int32).ravel()
  valid = ((labels != ignore_index) & (labels >= 0) & (labels < num_classes)
           & (preds >= 0) & (preds < num_classes))
  index = jnp.where(valid, labels * num_classes + preds, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def accumulate(total: np.ndarray | None, confusion: jax.Array | np.ndarray) -> np.ndarray:
  """total + confusion as int64 on the host (total=None starts a sum); int32 would overflow on a split."""
  confusion = np.asarray(confusion, dtype=np.int64)
  return confusion if total is None else total + confusion


def _nanmean(values: np.ndarray) -> float:
  defined = values[~np.isnan(values)]
  return float(defined.mean()) if defined.size else float("nan")


def segmentation_scores(confusion: np.ndarray, class_names: Sequence[str],
                        background_index: int | None = None) -> dict[str, float]:
  """Scores from a [K, K] confusion matrix (rows: true class, columns: predicted).

  Returns a flat dict (ready for JSON lines and TensorBoard): "iou/<name>" and
  "f1/<name>" per class, "miou" and "mf1" over the classes whose score is defined,
  "pixel_accuracy", and, when `background_index` is given, "miou_no_background" and
  "mf1_no_background" over the other classes. Absent classes give NaN entries.
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  k = len(class_names)
  if confusion.shape != (k, k):
    raise ValueError(f"confusion matrix has shape {confusion.shape}, expected ({k}, {k}) for "
                     f"{k} class_names")
  if background_index is not None and not 0 <= background_index < k:
    raise ValueError(f"background_index={background_index} is not a class index in [0, {k})")
  true_pos = np.diag(confusion)
  false_pos = confusion.sum(axis=0) - true_pos
  false_neg = confusion.sum(axis=1) - true_pos
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = true_pos / (true_pos + false_pos + false_neg)
    f1 = 2 * true_pos / (2 * true_pos + false_pos + false_neg)
    accuracy = true_pos.sum() / confusion.sum()

  scores = {"miou": _nanmean(iou), "mf1": _nanmean(f1), "pixel_accuracy": float(accuracy)}
  if background_index is not None:
    foreground = np.arange(k) != background_index
    scores["miou_no_background"] = _nanmean(iou[foreground])
    scores["mf1_no_background"] = _nanmean(f1[foreground])
  for name, class_iou, class_f1 in zip(class_names, iou, f1):
    scores[f"iou/{name}"] = float(class_iou)
    scores[f"f1/{name}"] = float(class_f1)
  return scores
