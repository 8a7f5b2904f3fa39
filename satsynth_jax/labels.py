"""Label codecs: class maps <-> continuous channels the diffusion model can denoise.

The paper's codec writes class k as its ceil(log2 K) binary digits ("analog bits"); a
sample is decoded to the *nearest valid code* among bin(0..K-1), so codes >= K never
appear even when K is not a power of two. One-hot (K channels, argmax decode) is the
ablation. Functions accept NumPy or JAX arrays and return the same kind, so one codec
serves the data pipeline (NumPy) and jitted sampling (JAX).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ENCODINGS = ("bits", "onehot")


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def num_bits(num_classes: int) -> int:
  """Bit channels for K classes: ceil(log2 K), at least 1."""
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return max(1, math.ceil(math.log2(num_classes)))


def num_label_channels(num_classes: int, encoding: str = "bits") -> int:
  if encoding == "bits":
    return num_bits(num_classes)
  if encoding == "onehot":
    return num_classes
  raise ValueError(f"unknown label encoding {encoding!r}; expected one of {ENCODINGS}")


def class_codes(num_classes: int, encoding: str = "bits") -> np.ndarray:
  """[K, C] float32 table: row k is the code of class k in [0, 1]."""
  if encoding == "onehot":
    return np.eye(num_classes, dtype=np.float32)
  bits = num_label_channels(num_classes, encoding)
  k = np.arange(num_classes)[:, None]
  return ((k >> np.arange(bits)[None, :]) & 1).astype(np.float32)  # little-endian bits


def encode(mask, num_classes: int, encoding: str = "bits"):
  """Integer class map [..., H, W] -> codes [..., H, W, C] in {0, 1} (float32)."""
  xp = _xp(mask)
  mask = xp.asarray(mask)
  codes = xp.asarray(class_codes(num_classes, encoding))
  return codes[mask.astype(xp.int32)]


def decode(codes, num_classes: int, encoding: str = "bits"):
  """Continuous codes [..., C] (in [0, 1]) -> nearest valid class index [...] (int32).

  Nearest in Euclidean distance over the valid codes; for bits and a power-of-two K
  this equals thresholding each bit at 0.5.
  """
  xp = _xp(codes)
  codes = xp.asarray(codes, dtype=xp.float32)
  if encoding == "onehot":
    return xp.argmax(codes, axis=-1).astype(xp.int32)
  table = xp.asarray(class_codes(num_classes, encoding))  # [K, C]
  # argmin_k |x - c_k|^2 = argmin_k (|c_k|^2 - 2 x.c_k): one matmul, no [.., K, C] temp.
  scores = xp.sum(table * table, axis=-1) - 2.0 * (codes @ table.T)
  return xp.argmin(scores, axis=-1).astype(xp.int32)


def to_signed(x):
  """[0, 1] -> [-1, 1], the range the diffusion model works in."""
  return 2.0 * x - 1.0


def from_signed(x):
  """[-1, 1] -> [0, 1], clipping first as the paper does for samples."""
  xp = _xp(x)
  return (xp.clip(x, -1.0, 1.0) + 1.0) / 2.0


def encode_pair(image, mask, num_classes: int, encoding: str = "bits"):
  """uint8 image [..., H, W, 3] and class map [..., H, W] -> joint [..., H, W, 3 + C] in [-1, 1]."""
  xp = _xp(image)
  rgb = xp.asarray(image, dtype=xp.float32) / 255.0
  return to_signed(xp.concatenate([rgb, encode(mask, num_classes, encoding)], axis=-1))


def decode_pair(joint, num_classes: int, encoding: str = "bits"):
  """Joint array in [-1, 1] -> (uint8 image [..., H, W, 3], int32 class map [..., H, W])."""
  xp = _xp(joint)
  unit = from_signed(joint)
  image = xp.round(unit[..., :3] * 255.0).astype(xp.uint8)
  return image, decode(unit[..., 3:], num_classes, encoding)
