"""Label codecs: class maps <-> continuous channels the diffusion model can denoise.

The paper's codec writes class k as its ceil(log2 K) binary digits ("analog bits"); a
sample is decoded to the *nearest valid code* among bin(0..K-1), so codes >= K never
appear even when K is not a power of two. One-hot (K channels, argmax decode) is the
ablation. Functions accept NumPy or JAX arrays and return the same kind, so one codec
serves the data pipeline (NumPy) and jitted sampling (JAX).

No-data (`ignore_index`, keyword of every codec function; None = the paper's codec):
no-data gets its own code, row K of the table, so synthetic masks carry no-data as no-data
instead of teaching a filled-in class the real loss never sees. Bits: the code of the
integer K in ceil(log2(K + 1)) bits (the spare code when K < 2^bits, e.g. 7 for K=7;
otherwise one more bit, e.g. K=8 -> 4 bits); one-hot: K + 1 channels. encode maps pixels
equal to ignore_index to row K; decode returns ignore_index for pixels nearest to row K.

Decoding rule (decode, decode_signed, decode_pair):
  1. Each pixel goes to the table row nearest in Euclidean distance (bits: over the K or
     K + 1 valid codes; one-hot: the largest channel, which is the same thing). The
     values are taken as they are, not clipped: decode_pair and decode_signed clip only
     the image. Clipping a sample beyond the unit cube squashes it onto a corner, which
     for K not a power of two is an unused code equidistant from several classes (K=7:
     every point beyond code 7 clips to it, and 7 is one bit from 3, 5 and 6); unclipped,
     the point keeps which bit is weakest and the nearest class follows from it.
  2. Exact ties (equal float32 scores) are broken uniformly at random among the tied
     rows when `rng` is given: a numpy.random.Generator for NumPy input, a JAX PRNG key
     for JAX input (works inside jit). Without rng the lowest tied row wins (argmin),
     deterministic and identical to the codec before ties were randomised; it favours
     low class indices at ties, so decode model samples with an rng.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ENCODINGS = ("bits", "onehot")


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def _check_ignore_index(num_classes: int, ignore_index: int | None) -> None:
  if ignore_index is None:
    return
  if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
  if 0 <= ignore_index < num_classes:
    raise ValueError(f"ignore_index={ignore_index} collides with a class in [0, {num_classes})")


def num_bits(num_classes: int) -> int:
  """Bit channels for K classes: ceil(log2 K), at least 1."""
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return max(1, math.ceil(math.log2(num_classes)))


def num_label_channels(num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None) -> int:
  """Label channels C: bits ceil(log2 K) (ceil(log2(K + 1)) with no-data), one-hot K (K + 1)."""
  _check_ignore_index(num_classes, ignore_index)
  rows = num_classes + (ignore_index is not None)
  if encoding == "bits":
    return num_bits(rows)
  if encoding == "onehot":
    return rows
  raise ValueError(f"unknown label encoding {encoding!r}; expected one of {ENCODINGS}")


def class_codes(num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None) -> np.ndarray:
  """[K, C] float32 table (in [0, 1]): row k is the code of class k; row K is no-data if ignore_index is set."""
  channels = num_label_channels(num_classes, encoding, ignore_index=ignore_index)
  rows = num_classes + (ignore_index is not None)
  if encoding == "onehot":
    return np.eye(rows, dtype=np.float32)
  k = np.arange(rows)[:, None]
  return ((k >> np.arange(channels)[None, :]) & 1).astype(np.float32)  # little-endian bits


def _row_index(mask, num_classes: int, ignore_index: int | None):
  """Class map -> (table row per pixel, valid per pixel); rows of invalid pixels are 0."""
  xp = _xp(mask)
  # Validate before any narrowing cast, so e.g. a uint32 2**32 - 1 cannot become -1.
  mask = mask.astype(xp.int64) if xp is np else mask.astype(jnp.int32)
  valid = (mask >= 0) & (mask < num_classes)
  if ignore_index is not None:
    is_ignore = mask == ignore_index
    valid = valid | is_ignore
    mask = xp.where(is_ignore, num_classes, mask)
  return xp.where(valid, mask, 0).astype(xp.int32), valid


def encode(mask, num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None):
  """Integer class map [..., H, W] -> codes [..., H, W, C] in {0, 1} (float32).

  Pixels equal to ignore_index (if set) get the no-data code. Any other value outside
  [0, K) is invalid: NumPy input raises ValueError; JAX input (traced, so it cannot raise)
  yields NaN codes there, and the caller validates if it cannot rule such values out.
  """
  xp = _xp(mask)
  mask = xp.asarray(mask)
  codes = xp.asarray(class_codes(num_classes, encoding, ignore_index=ignore_index))
  rows, valid = _row_index(mask, num_classes, ignore_index)
  if xp is np:
    if not valid.all():
      bad = np.unique(mask[~valid])[:8].tolist()
      allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
      raise ValueError(f"mask values {bad} are not classes in {allowed}")
    return codes[rows]
  # NaN rather than a silent class: a stray value then shows up as a NaN loss.
  return jnp.where(valid[..., None], codes[rows], jnp.nan)


def _pick_nearest(scores, rng):
  """argmin over the last axis; with rng, exact ties go uniformly to one of the tied entries."""
  xp = _xp(scores)
  if rng is None:
    return xp.argmin(scores, axis=-1)
  tied = scores == scores.min(axis=-1, keepdims=True)
  count = xp.maximum(tied.sum(axis=-1), 1)  # 0 only for NaN scores
  if xp is np:
    if not isinstance(rng, np.random.Generator):
      raise TypeError(f"NumPy codes need rng=numpy.random.Generator, got {type(rng).__name__}")
    pick = np.asarray(rng.integers(0, count))
  else:
    if isinstance(rng, np.random.Generator):
      raise TypeError("JAX codes need rng=a JAX PRNG key, got a numpy.random.Generator")
    pick = jax.random.randint(rng, count.shape, 0, count)
  # The pick-th tied entry (0-based), located via the running count of ties.
  rank = xp.cumsum(tied, axis=-1)
  return xp.argmax(tied & (rank == pick[..., None] + 1), axis=-1)


def decode(codes, num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None, rng=None):
  """Continuous codes [..., C] -> class index [...] (int32) by the module's decoding rule.

  Codes are in [0, 1] units but need not lie in [0, 1]: nothing is clipped here. Bits:
  nearest code in Euclidean distance (for a power-of-two K without no-data this equals
  thresholding each bit at 0.5); one-hot: argmax. Pixels nearest to the no-data row
  decode to ignore_index. rng (numpy Generator for NumPy input, JAX key for JAX input)
  breaks exact ties uniformly; without it the lowest index wins.
  """
  xp = _xp(codes)
  codes = xp.asarray(codes, dtype=xp.float32)
  channels = num_label_channels(num_classes, encoding, ignore_index=ignore_index)
  if codes.shape[-1:] != (channels,):
    raise ValueError(f"{encoding} codes for {num_classes} classes (ignore_index={ignore_index}) "
                     f"have {channels} channels, got shape {codes.shape}")
  if encoding == "onehot":
    # Nearest one-hot row = largest channel; -x keeps ties exact (1 - 2x could round into one).
    scores = -codes
  else:
    table = xp.asarray(class_codes(num_classes, encoding, ignore_index=ignore_index))  # [K(+1), C]
    # argmin_k |x - c_k|^2 = argmin_k (|c_k|^2 - 2 x.c_k): one matmul, no [.., K, C] temp.
    # HIGHEST keeps full float32 on GPUs (TF32 would shift scores and break exact ties).
    dots = codes @ table.T if xp is np else jnp.matmul(codes, table.T, precision=jax.lax.Precision.HIGHEST)
    scores = xp.sum(table * table, axis=-1) - 2.0 * dots
  index = _pick_nearest(scores, rng).astype(xp.int32)
  if ignore_index is not None:
    index = xp.where(index == num_classes, xp.int32(ignore_index), index)
  return index


def to_signed(x):
  """[0, 1] -> [-1, 1], the range the diffusion model works in."""
  return 2.0 * x - 1.0


def from_signed(x):
  """[-1, 1] -> [0, 1], clipping first as the paper does for samples."""
  xp = _xp(x)
  return (xp.clip(x, -1.0, 1.0) + 1.0) / 2.0


def decode_signed(label, num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None, rng=None):
  """Label channels of a model sample in [-1, 1] units [..., C] -> class index [...], unclipped.

  Use this (not decode(from_signed(x))) for samples: clipping first turns points beyond
  an unused code into exact ties (see the module docstring).
  """
  xp = _xp(label)
  unit = (xp.asarray(label, dtype=xp.float32) + 1.0) / 2.0
  return decode(unit, num_classes, encoding, ignore_index=ignore_index, rng=rng)


def encode_pair(image, mask, num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None):
  """uint8 image [..., H, W, 3] and class map [..., H, W] -> joint [..., H, W, 3 + C] in [-1, 1].

  With ignore_index, no-data pixels get the no-data code (see encode).
  """
  xp = _xp(image)
  rgb = xp.asarray(image, dtype=xp.float32) / 255.0
  code = encode(mask, num_classes, encoding, ignore_index=ignore_index)
  return to_signed(xp.concatenate([rgb, code], axis=-1))


def decode_pair(joint, num_classes: int, encoding: str = "bits", *, ignore_index: int | None = None, rng=None):
  """Joint sample [..., H, W, 3 + C] in [-1, 1] -> (uint8 image [..., H, W, 3], int32 class map [..., H, W]).

  The image is clipped as the paper says; the labels are decoded from the unclipped values
  (decode_signed), with no-data pixels as ignore_index and ties broken by rng if given.
  """
  xp = _xp(joint)
  image = xp.round(from_signed(joint[..., :3]) * 255.0).astype(xp.uint8)
  return image, decode_signed(joint[..., 3:], num_classes, encoding, ignore_index=ignore_index, rng=rng)


def encode_real_pair(image, mask, num_classes: int, encoding: str = "bits", *, ignore_index: int,
                     no_data_code: bool, fill_class: int = 0):
  """A real pair -> G's joint input in [-1, 1]; no-data pixels (mask == ignore_index) get the no-data
  code when `no_data_code`, else become `fill_class` (the paper's codec has no code for them)."""
  if no_data_code:
    return encode_pair(image, mask, num_classes, encoding, ignore_index=ignore_index)
  xp = _xp(mask)
  return encode_pair(image, xp.where(mask == ignore_index, fill_class, mask), num_classes, encoding)


def presence(mask, num_classes: int):
  """Which classes a mask [..., H, W] holds: float32 [..., K] in {0, 1}; no-data (any value >= K) never counts.

  G's class-presence condition (diffusion/guidance.py) for a pair.
  """
  xp = _xp(mask)
  flat = mask.reshape(mask.shape[:-2] + (-1,))
  return (flat[..., None, :] == xp.arange(num_classes).reshape(num_classes, 1)).any(axis=-1).astype(xp.float32)
