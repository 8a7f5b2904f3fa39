"""Sample-quality scores as the paper defines them: FID, sFID and IS from a segmentation network.

The paper replaces Inception with a ResNet-50 U-Net segmenter trained on the dataset's real
pairs (models/unet_seg.py, `return_features=True`), so the features know aerial scenes:

  FID   Fréchet distance between Gaussians fitted to the pooled C5 encoder features [2048]
        of real and of generated images.
  sFID  the same distance on the spatial features (the first 7 channels of C3, flattened).
  IS    exp(E_x KL(p(y|x) || p(y))). A segmenter gives a class distribution per pixel, so
        p(y|x) is its softmax averaged over the pixels of image x (the expected class share
        of the image, a distribution over the K classes), and p(y) = E_x p(y|x) over the
        scored images. IS lies in [1, K]: 1 when every image gets the same distribution,
        K when each image is confidently one class and the classes are used equally often.

Device side: `extract_features` (jittable) maps a batch of images to the three feature
sets. Host side: `FeatureAccumulator` streams batches into float64 moments, and the
scores are computed in float64 NumPy, without SciPy.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

FEATURE_SETS = ("pooled", "spatial")  # FID, sFID


def extract_features(apply_fn: Callable[..., Any], variables: Any, images: jax.Array) -> dict[str, jax.Array]:
  """Segmenter features of images [B, H, W, 3] in [0, 1]; jittable (partial over apply_fn).

  Args:
    apply_fn: `UNetSegmenter(...).apply`.
    variables: the trained segmenter's {"params", "batch_stats"}; run in eval mode.
    images: float images in [0, 1], as the segmenter was trained on.

  Returns:
    float32 {"pooled": [B, 2048] (FID), "spatial": [B, N] (sFID), "probs": [B, K] p(y|x),
    the per-pixel softmax averaged over the image (IS)}.
  """
  logits, features = apply_fn(variables, images, train=False, return_features=True)
  probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(1, 2))
  return {"pooled": features["pooled"], "spatial": features["spatial"], "probs": probs}


def _as_matrix(features, what: str) -> np.ndarray:
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{what} must be [N, D], got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{what} hold non-finite values")
  return x


class RunningMoments:
  """Mean and covariance of a stream of [B, D] batches, merged exactly in float64.

  Each batch is centred on its own mean and merged with the pairwise update of Chan et al.,
  so no large uncentred sum of squares loses precision; the result equals the one-pass
  mean and unbiased covariance of all rows at once.
  """

  def __init__(self):
    self.count = 0
    self._mean: np.ndarray | None = None
    self._scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean

  def update(self, batch) -> None:
    x = _as_matrix(batch, "feature batch")
    n = x.shape[0]
    if n == 0:
      return
    mean = x.mean(axis=0)
    centred = x - mean
    scatter = centred.T @ centred
    if self._mean is None:
      self.count, self._mean, self._scatter = n, mean, scatter
      return
    if x.shape[1] != self._mean.shape[0]:
      raise ValueError(f"feature batch has {x.shape[1]} dims, earlier batches had {self._mean.shape[0]}")
    total = self.count + n
    delta = mean - self._mean
    self._scatter += scatter + np.outer(delta, delta) * (self.count * n / total)
    self._mean += delta * (n / total)
    self.count = total

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of every row seen so far."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    return self._mean.copy(), self._scatter / (self.count - 1)


class FeatureAccumulator:
  """Streams `extract_features` outputs batch by batch: moments for FID/sFID, p(y|x) for IS.

  Pass host arrays (e.g. `parallel.to_host` of the jitted output). `valid` drops padded rows
  (the eval pipeline pads the last batch), so every image counts exactly once.
  """

  def __init__(self):
    self.moments = {name: RunningMoments() for name in FEATURE_SETS}
    self._probs: list[np.ndarray] = []

  def update(self, features: dict, valid=None) -> None:
    keep = slice(None) if valid is None else np.asarray(valid, bool)
    for name, moments in self.moments.items():
      moments.update(np.asarray(features[name])[keep])
    self._probs.append(np.asarray(features["probs"], np.float64)[keep])

  @property
  def count(self) -> int:
    return self.moments[FEATURE_SETS[0]].count

  def statistics(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of feature set `name`: "pooled" (FID) or "spatial" (sFID)."""
    if name not in self.moments:
      raise ValueError(f"unknown feature set {name!r}; expected one of {FEATURE_SETS}")
    return self.moments[name].statistics()

  def probs(self) -> np.ndarray:
    """p(y|x) of every image seen, [N, K] float64, in update order."""
    if not self._probs:
      raise ValueError("no batch was accumulated")
    return np.concatenate(self._probs)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (rounding) -> 0."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2). The cross term uses
  the symmetric PSD product S1^1/2 S2 S1^1/2 (similar to S1 S2), whose square root comes from
  a symmetric eigendecomposition: no matrix inverse, so singular covariances (fewer samples
  than dimensions) need no offset and give the exact value. Rounding can make d^2 a hair
  below zero for identical inputs; the result is clipped at 0.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.ndim != 1:
    raise ValueError(f"mu1 must be a mean vector [D], got shape {mu1.shape}")
  dim = mu1.shape[0]
  for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)),
                             ("sigma2", sigma2, (dim, dim))):
    if value.shape != shape:
      raise ValueError(f"{name} has shape {value.shape}, expected {shape} (D={dim} from mu1)")
    if not np.isfinite(value).all():
      raise ValueError(f"{name} holds non-finite values")
  root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
  middle = root1 @ sigma2 @ root1
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)))
  diff = mu1 - mu2
  return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross), 0.0)


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))), float64.

  Args:
    probs: p(y|x) per image [N, K] (`extract_features(...)["probs"]`), rows summing to 1.
    splits: parts scored separately, each with its own marginal p(y) (10 is the usual
      protocol); N >= splits.
  """
  p = _as_matrix(probs, "probs")
  if not 1 <= splits <= p.shape[0]:
    raise ValueError(f"splits={splits} must be in [1, {p.shape[0]}] (the number of images)")
  if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
    raise ValueError("probs rows must be class distributions (non-negative, summing to 1)")
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(axis=0)
    # 0 log 0 = 0; where p(y|x) > 0, p(y) > 0 too.
    ratio = np.divide(part, marginal, out=np.ones_like(part), where=part > 0)
    scores.append(np.exp(np.mean(np.sum(part * np.log(ratio), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))
