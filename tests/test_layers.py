"""models/layers.py against the plain formulations: flax GroupNorm (+ SiLU), lax convolution, nn.Dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satsynth_jax.models import layers

TOL = dict(rtol=2e-5, atol=2e-5)  # float32: the sums run in another order than the plain ones


def _normal(shape, seed, scale=1.0, shift=0.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift, jnp.float32)


def _plain_group_norm(x, scale, bias, groups, act):
  y = nn.GroupNorm(num_groups=groups, epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
  return nn.silu(y) if act else y


def _fused_group_norm(x, scale, bias, groups, act):
  return layers.group_norm(x, scale, bias, groups=groups, epsilon=1e-6, act=act)


# 96 channels in 32 groups (3 per group, as the U-Net's decoder has), one channel per group, wider groups.
SHAPES = [((2, 8, 8, 96), 32), ((3, 4, 4, 32), 32), ((2, 4, 6, 64), 8)]


@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_group_norm_matches_flax_and_its_gradients(shape, groups, act):
  c = shape[-1]
  x = _normal(shape, 0, scale=2.0, shift=0.5)  # an offset mean: E[x^2] - E[x]^2 must still hold
  scale, bias = _normal((c,), 1, 0.1, 1.0), _normal((c,), 2, 0.1)
  weights = _normal(shape, 3)
  plain = jax.jit(_plain_group_norm, static_argnums=(3, 4))
  fused = jax.jit(_fused_group_norm, static_argnums=(3, 4))
  np.testing.assert_allclose(fused(x, scale, bias, groups, act), plain(x, scale, bias, groups, act), **TOL)

  def grads(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a, groups, act) * weights), argnums=(0, 1, 2)))(x, scale, bias)

  for got, want in zip(grads(_fused_group_norm), grads(_plain_group_norm)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_group_norm_takes_bfloat16_and_returns_float32():
  x = _normal((2, 4, 4, 64), 0)
  scale, bias = jnp.ones(64), jnp.zeros(64)
  y = layers.group_norm(x.astype(jnp.bfloat16), scale, bias, groups=32, epsilon=1e-6, act=True)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, _plain_group_norm(x, scale, bias, 32, True), atol=0.05)


def test_group_norm_module_has_flax_variables():
  x = jnp.zeros((1, 4, 4, 64))
  ours = layers.GroupNorm(num_groups=32, act=True).init(jax.random.key(0), x)
  flax_norm = nn.GroupNorm(num_groups=32).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), flax_norm)
  jax.tree.map(np.testing.assert_array_equal, ours, flax_norm)


def test_group_norm_refuses_channels_that_do_not_split_into_groups():
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    layers.group_norm(jnp.zeros((1, 2, 2, 48)), jnp.ones(48), jnp.zeros(48), groups=32, epsilon=1e-6)


CONVS = [  # (input shape, kernel, stride, padding)
    ((2, 8, 8, 16), 1, 1, "SAME"),
    ((2, 8, 8, 16), 1, 2, ((0, 0), (0, 0))),  # ResNet's strided projection shortcut
    ((2, 7, 9, 16), 1, 2, "SAME"),  # odd sizes round up, as torch's strided convs
    ((2, 8, 8, 16), 3, 1, ((1, 1), (1, 1))),  # not 1x1: lax's own convolution
]


@pytest.mark.parametrize("shape,kernel,stride,padding", CONVS)
@pytest.mark.parametrize("features", [8, 32])  # narrower and wider than the input
def test_conv_matches_lax_conv_and_its_gradients(shape, kernel, stride, padding, features):
  x = _normal(shape, 0)

  def conv(impl):
    module = nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, conv_general_dilated=impl)
    return module, module.init(jax.random.key(1), x)

  plain, variables = conv(jax.lax.conv_general_dilated)
  ours, _ = conv(layers.conv_general_dilated)
  weights = _normal(plain.apply(variables, x).shape, 2)

  def value_and_grads(module):
    f = lambda v, x: jnp.sum(module.apply(v, x) * weights)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(variables, x)

  got, want = value_and_grads(ours), value_and_grads(plain)
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x), **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


@pytest.mark.parametrize("features", [4, 64])  # narrower and wider than the input
def test_dense_matches_nn_dense_and_its_gradients(features):
  x = _normal((2, 5, 5, 16), 0)
  plain, ours = nn.Dense(features), nn.Dense(features, dot_general=layers.dot_general)
  variables = plain.init(jax.random.key(1), x)
  weights = _normal((2, 5, 5, features), 2)

  def value_and_grads(module):
    f = lambda v, x: jnp.sum(module.apply(v, x) * weights)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(variables, x)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               value_and_grads(ours), value_and_grads(plain))


def test_other_contractions_fall_back_to_lax():
  a, b = _normal((3, 4), 0), _normal((3, 5), 1)
  contract_first = (((0,), (0,)), ((), ()))
  np.testing.assert_array_equal(layers.dot_general(a, b, contract_first), jax.lax.dot_general(a, b, contract_first))


def test_modulated_group_norm_matches_adm_scale_shift_and_its_gradients():
  """GroupNorm(x, modulation=(s, t)) = silu(GroupNorm(x) * (1 + s) + t), the U-Net's scale_shift path."""
  x, s, t = _normal((2, 4, 4, 64), 0, 2.0, 0.5), _normal((2, 64), 1, 0.3), _normal((2, 64), 2, 0.3)
  module = layers.GroupNorm(num_groups=32, act=True)
  variables = {"params": {"scale": _normal((64,), 3, 0.1, 1.0), "bias": _normal((64,), 4, 0.1)}}
  weights = _normal(x.shape, 5)

  def fused(v, x, s, t):
    return jnp.sum(module.apply(v, x, modulation=(s, t)) * weights)

  def plain(v, x, s, t):
    y = nn.GroupNorm(num_groups=32, epsilon=1e-6).apply(v, x)
    return jnp.sum(nn.silu(y * (1.0 + s[:, None, None]) + t[:, None, None]) * weights)

  got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(variables, x, s, t) for f in (fused, plain))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
