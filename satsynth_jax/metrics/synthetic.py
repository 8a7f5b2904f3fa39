"""How a synthetic set's labels compare with the real ones: class shares, their distance, presence accuracy.

Pure NumPy on counts and presence vectors; jobs/sample_quality.py and the generator benchmarks use them.
"""

from __future__ import annotations

import numpy as np


def class_shares(class_pixels) -> np.ndarray:
  """Each class's fraction of the labelled pixels (all zeros for a set without labels)."""
  pixels = np.asarray(class_pixels, np.float64)
  return pixels / max(pixels.sum(), 1.0)


def total_variation(p, q) -> float:
  """0.5 sum |p - q| of two class-share vectors: 0 for equal shares, 1 for disjoint ones."""
  return float(0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def presence_accuracy(requested, produced) -> np.ndarray:
  """float64 [K]: of the pairs asked for class c (requested[:, c] = 1), the fraction whose mask holds c
  (produced[:, c] = 1); NaN for a class no pair asked for."""
  requested = np.asarray(requested, bool)
  produced = np.asarray(produced, bool)
  if requested.shape != produced.shape:
    raise ValueError(f"requested {requested.shape} and produced {produced.shape} presence differ in shape")
  asked = requested.sum(axis=0)
  hits = (requested & produced).sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(asked > 0, hits / np.maximum(asked, 1), np.nan)
