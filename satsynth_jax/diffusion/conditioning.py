"""G_SR's conditioning: a high-res joint pair <-> its low-res version, upsampled as G_SR's condition.

At every denoising step G_SR sees the noisy high-res joint pair concatenated (channel axis)
with the low-res pair upsampled to high res: the image bilinearly, the label code by nearest
neighbour after snapping it to the nearest valid class, so the condition's label channels
are exactly ±1 and its class edges stay crisp.

Training pairs are real patches at high res and their downsampled versions: the image
area-averaged (as the data pipeline shrinks images), the mask sampled at the low-res pixel
centres (nearest, as the pipeline resizes masks). The same NumPy/JAX functions build the
condition in the grain pipeline and inside the jitted cascade sampler, so training and
sampling see identical conditioning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from satsynth_jax import labels


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def downsample_joint(joint, factor: int):
  """Joint pairs [..., S, S, 3 + C] -> [..., S/f, S/f, 3 + C]: image area mean, labels nearest.

  Label channels are sampled at the low-res pixel centres (row f*i + f//2), which keeps
  them valid codes; averaging them would blend classes at edges.
  """
  *lead, height, width, channels = joint.shape
  if height % factor or width % factor:
    raise ValueError(f"joint of {height}x{width} pixels is not divisible by the scale factor {factor}")
  image = joint[..., :3].reshape(*lead, height // factor, factor, width // factor, factor, 3)
  image = image.mean(axis=(-4, -2))
  label = joint[..., factor // 2::factor, factor // 2::factor, 3:]
  return _xp(joint).concatenate([image, label], axis=-1)


def _linear_weights(size: int, factor: int) -> np.ndarray:
  """[size * f, size] bilinear weights with half-pixel centres, clamped at the borders."""
  source = np.clip((np.arange(size * factor) + 0.5) / factor - 0.5, 0.0, size - 1)
  left = np.floor(source).astype(np.intp)
  right = np.minimum(left + 1, size - 1)
  frac = source - left
  weights = np.zeros((size * factor, size), np.float32)
  rows = np.arange(size * factor)
  np.add.at(weights, (rows, left), 1.0 - frac)
  np.add.at(weights, (rows, right), frac)
  return weights


def upsample_condition(low_joint, factor: int, num_classes: int, encoding: str = "bits", *,
                       ignore_index: int | None = None, rng=None):
  """Low-res joint pairs [..., s, s, 3 + C] in [-1, 1] -> G_SR's condition [..., s*f, s*f, 3 + C].

  Image channels: bilinear. Label channels: snapped to the nearest valid code (a class, or
  no-data when `ignore_index` gives the codec a no-data code; a no-op for real data; for G's
  samples it removes the in-between values, exact ties broken by `rng`), then
  nearest-upsampled, so they are exactly ±1.
  """
  xp = _xp(low_joint)
  height, width = low_joint.shape[-3:-1]
  rows = xp.asarray(_linear_weights(height, factor))
  cols = xp.asarray(_linear_weights(width, factor))
  image = xp.einsum("ih,...hwc,jw->...ijc", rows, low_joint[..., :3].astype(xp.float32), cols)
  classes = labels.decode_signed(low_joint[..., 3:], num_classes, encoding, ignore_index=ignore_index, rng=rng)
  label = labels.to_signed(labels.encode(classes, num_classes, encoding, ignore_index=ignore_index))
  label = xp.repeat(xp.repeat(label, factor, axis=-3), factor, axis=-2)
  return xp.concatenate([image, label], axis=-1)


def training_pair(example: dict, *, factor: int, num_classes: int, encoding: str, ignore_index: int,
                  no_data_code: bool, fill_class: int) -> dict:
  """A high-res pair -> {"x": its joint in [-1, 1], "cond": its upsampled low-res version}."""
  joint = labels.encode_real_pair(example["image"], example["mask"], num_classes, encoding,
                                  ignore_index=ignore_index, no_data_code=no_data_code,
                                  fill_class=fill_class).astype(np.float32)
  cond = upsample_condition(downsample_joint(joint, factor), factor, num_classes, encoding,
                            ignore_index=ignore_index if no_data_code else None)
  return {"x": joint, "cond": cond.astype(np.float32)}
