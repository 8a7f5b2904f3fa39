"""Layers written for XLA:CPU: GroupNorm (+ SiLU) in two passes each way, 1x1 convolutions and dense layers as 2-D dots.

flax's GroupNorm followed by `nn.silu`, differentiated by JAX, becomes a dozen reduce and
elementwise fusions per layer on XLA:CPU (mean, variance, normalise, scale, SiLU, and their
transposes), each its own pass over memory; with the U-Net's small channel counts those passes,
not the convolutions, separated our train step from PyTorch's fused kernels (benchmarks/RESULTS.md).
`group_norm` computes the same function with a hand-written gradient:

  forward   per-(sample, channel) sums of x and x^2, then one elementwise pass y = act(x * a + d)
            with per-(sample, channel) a, d folding the mean, 1/std, scale and bias
  backward  per-(sample, channel) sums of dz and dz * x (dz: the gradient before the activation),
            then one elementwise pass dx = dz * a + x * e + f

Only x and per-group statistics are kept for the backward pass (the activation is recomputed).
Statistics use E[x^2] - E[x]^2 in float32, as flax's default (`use_fast_variance`).

`conv_general_dilated` and `dot_general` plug into flax's `nn.Conv` / `nn.Dense` and keep their
parameters; they route 1x1 convolutions and dense layers through a 2-D dot over [pixels, channels],
whose gradients XLA:CPU runs without the whole-image convolution and layout copies it otherwise uses.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _silu(z: jax.Array) -> jax.Array:
  # A division last: XLA:CPU does not duplicate a divide into several consumers, so the output is
  # written once and the convolution's filter-gradient transposes read it, instead of each
  # recomputing it from x (what x * sigmoid(x), ending in a multiply, leads to).
  return z / (1.0 + jnp.exp(-z))


def _silu_slope(z: jax.Array) -> jax.Array:
  """d silu / dz."""
  s = jax.nn.sigmoid(z)
  return s * (1.0 + z * (1.0 - s))


def _moments(x3: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """Per-(sample, channel) mean and 1/std of the channel's group from x3 [B, N, C] (float32)."""
  b, n, c = x3.shape
  size = n * (c // groups)
  s1 = jnp.sum(x3, axis=1)
  s2 = jnp.sum(x3 * x3, axis=1)
  mean = jnp.sum(s1.reshape(b, groups, -1), axis=-1) / size
  var = jnp.maximum(jnp.sum(s2.reshape(b, groups, -1), axis=-1) / size - mean * mean, 0.0)
  return mean, var


def _per_channel(g: jax.Array, c: int) -> jax.Array:
  """[B, G] group values -> [B, C]."""
  return jnp.repeat(g, c // g.shape[1], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x3, scale, bias, groups: int, epsilon: float, act: bool):
  return _forward(x3, scale, bias, groups, epsilon, act)[0]


def _forward(x3, scale, bias, groups, epsilon, act):
  """x3 [B, N, C]; scale, bias [B, C] (per sample: ADM's scale-shift folds in)."""
  c = x3.shape[-1]
  mean, var = _moments(x3, groups)
  rstd = jax.lax.rsqrt(var + epsilon)
  a = _per_channel(rstd, c) * scale
  d = bias - _per_channel(mean, c) * a
  z = x3 * a[:, None] + d[:, None]
  y = _silu(z) if act else z
  return y, (x3, scale, bias, mean, rstd)


def _backward(groups, epsilon, act, residuals, dy):
  del epsilon
  x3, scale, bias, mean, rstd = residuals
  b, n, c = x3.shape
  size = n * (c // groups)
  mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
  a = rstd_c * scale
  d = bias - mean_c * a
  dz = dy * _silu_slope(x3 * a[:, None] + d[:, None]) if act else dy
  s_dz = jnp.sum(dz, axis=1)  # [B, C]: the bias gradient
  s_dzx = jnp.sum(dz * x3, axis=1)
  s_dzxhat = rstd_c * (s_dzx - mean_c * s_dz)  # sum of dz * xhat: the scale gradient
  # dxhat = dz * scale; with m1, m2 the group means of dxhat and dxhat * xhat,
  # dx = rstd * (dxhat - m1 - xhat * m2) = dz * a + x * e + f.
  m1 = jnp.sum((s_dz * scale).reshape(b, groups, -1), axis=-1) / size
  m2 = jnp.sum((s_dzxhat * scale).reshape(b, groups, -1), axis=-1) / size
  e = _per_channel(-rstd * rstd * m2, c)
  f = _per_channel(rstd * (rstd * mean * m2 - m1), c)
  dx = dz * a[:, None] + x3 * e[:, None] + f[:, None]
  return dx, s_dzxhat, s_dz


_group_norm.defvjp(_forward, _backward)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, groups: int, epsilon: float,
               act: bool = False) -> jax.Array:
  """GroupNorm of channels-last `x` ([B, ..., C]); SiLU after if `act`. Float32 compute and output.

  `scale` and `bias` are per channel ([C]) or per sample and channel ([B, C]), e.g. GroupNorm's own
  affine times ADM's (1 + scale) plus its shift: the modulation then costs no pass of its own.
  """
  batch, c = x.shape[0], x.shape[-1]
  if c % groups:
    raise ValueError(f"group_norm: {c} channels do not split into {groups} groups")
  x3 = x.astype(jnp.float32).reshape(batch, -1, c)
  per_sample = lambda v: jnp.broadcast_to(v.astype(jnp.float32), (batch, c))
  y = _group_norm(x3, per_sample(scale), per_sample(bias), groups, float(epsilon), bool(act))
  return y.reshape(x.shape)


class GroupNorm(nn.Module):
  """flax.linen.GroupNorm's parameters ("scale", "bias", per channel) computed by `group_norm`,
  with the SiLU that follows it in the same pass when `act`. Output float32.

  Called with `modulation=(scale, shift)` ([B, C] each) it returns act(norm(x) * (1 + scale) + shift),
  ADM's time conditioning, in the same pass.
  """

  num_groups: int
  epsilon: float = 1e-6
  act: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, modulation: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    if modulation is not None:
      times, shift = (m.astype(jnp.float32) for m in modulation)
      scale, bias = scale * (1.0 + times), bias * (1.0 + times) + shift
    return group_norm(x, scale, bias, groups=self.num_groups, epsilon=self.epsilon, act=self.act)


_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _channels_last(dimension_numbers, ndim: int) -> bool:
  """NHWC input and output with an HWIO kernel (what flax passes for 2-D convolutions)."""
  return ndim == 4 and jax.lax.conv_dimension_numbers(
      (1,) * ndim, (1,) * ndim, dimension_numbers) == _NHWC


def _unpadded(padding) -> bool:
  return padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for flax's `nn.Conv(conv_general_dilated=...)`, with 1x1 kernels as dots.

  XLA:CPU turns a 1x1 convolution's forward pass into a dot but its filter gradient into a
  convolution over the whole image, fed by transposed copies of the activation (batch innermost:
  slow for small batches) into which XLA also recomputes the producing BatchNorm/ReLU chain. As a
  2-D dot over [pixels, channels] the filter gradient is a dot too (benchmarks/RESULTS.md).
  """
  kh, kw = rhs.shape[:2]
  plain = (kh, kw) != (1, 1) or feature_group_count != 1 or any(d not in (None, 1) for d in (
      *(lhs_dilation or ()), *(rhs_dilation or ())))
  if plain or not _channels_last(dimension_numbers, lhs.ndim) or not _unpadded(padding):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision)
  sh, sw = window_strides
  x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
  return _matmul(x, rhs[0, 0], precision)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for flax's `nn.Dense(dot_general=...)`: x [..., I] @ kernel [I, O] as a 2-D dot.

  On the activation's own rank, jax's gradient of the dot contracts the pixel axes as several
  dimensions; on the [pixels, I] view both gradients are plain 2-D dots, which XLA:CPU runs with
  fewer layout copies (benchmarks/RESULTS.md). Other contractions go to `lax.dot_general` unchanged.
  """
  if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or rhs.ndim != 2 or any(
      dimension_numbers[1]) or preferred_element_type is not None:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
  return _matmul(lhs, rhs, precision)


def _matmul(x: jax.Array, w: jax.Array, precision) -> jax.Array:
  """x [..., I] @ w [I, O] through the 2-D view [pixels, I]."""
  y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())), precision=precision)
  return y.reshape(*x.shape[:-1], w.shape[-1])
