"""DDPM U-Net: reference parameter count, shapes/dtypes, bf16 path, dropout, conditioning."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from satsynth_jax.models.unet import UNet, timestep_embedding, unet_from_config

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), out_channels=5)


def _param_count(model: UNet, shape, cond_channels: int = 0) -> int:
  x = jnp.zeros(shape)
  t = jnp.zeros((shape[0],), jnp.int32)
  cond = jnp.zeros(shape[:3] + (cond_channels,)) if cond_channels else None
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond=cond))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables))


def _random_variables(model: UNet, x, t, cond=None, seed: int = 1):
  """Random non-trivial parameters without `init`: the zero-initialised output layers would
  hide every effect, and compiling `init` costs seconds per test on a small CPU."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond=cond))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * noise
    if name == "kernel":
      return noise / np.sqrt(math.prod(leaf.shape[:-1]))
    return 0.1 * noise

  return jax.tree.map_with_path(draw, shapes)


def _apply(model: UNet):
  # One compiled program per model: eager op-by-op dispatch compiles every layer separately.
  return jax.jit(model.apply, static_argnames="train")


def _inputs(shape=(2, 16, 16, 3), seed=0):
  kx, kt = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, shape), jax.random.randint(kt, (shape[0],), 0, 1000)


def _conv3(cin, cout):
  return 9 * cin * cout + cout


def _dense(cin, cout):
  return cin * cout + cout


def _norm(c):
  return 2 * c  # GroupNorm scale and bias


def _res(cin, cout, temb):
  """GN, conv, time projection, GN, conv, and a 1x1 (dense) shortcut when the width changes."""
  return (_norm(cin) + _conv3(cin, cout) + _dense(temb, cout) + _norm(cout) + _conv3(cout, cout)
          + (_dense(cin, cout) if cin != cout else 0))


def _attn(c):
  return _norm(c) + 4 * _dense(c, c)  # q, k, v, proj_out


def _ddpm_unet_count(ch, ch_mult, num_res_blocks, attn_resolutions, size, in_ch, out_ch) -> int:
  """Ho et al.'s U-Net counted layer by layer from its description (appendix B), not from our code."""
  temb = 4 * ch
  total = _dense(ch, temb) + _dense(temb, temb) + _conv3(in_ch, ch)
  skips, c, res = [ch], ch, size
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total += _res(c, ch * mult, temb) + (_attn(ch * mult) if res in attn_resolutions else 0)
      c = ch * mult
      skips.append(c)
    if level != len(ch_mult) - 1:
      total += _conv3(c, c)  # stride-2 downsampling conv
      skips.append(c)
      res //= 2
  total += 2 * _res(c, c, temb) + _attn(c)  # middle: res, attention, res
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      cout = ch * ch_mult[level]
      total += _res(c + skips.pop(), cout, temb) + (_attn(cout) if res in attn_resolutions else 0)
      c = cout
    if level != 0:
      total += _conv3(c, c)  # conv after nearest x2 upsampling
      res *= 2
  assert not skips
  return total + _norm(c) + _conv3(c, out_ch)


def test_cifar10_parameter_count_matches_ddpm_reference():
  model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
               out_channels=3)
  count = _param_count(model, (1, 32, 32, 3))
  # 35,746,307: Ho et al.'s published CIFAR-10 size, which the layer-by-layer count also gives.
  assert _ddpm_unet_count(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3) == 35_746_307
  assert count == 35_746_307  # exact: same layers, biases and GroupNorm affines as Ho et al.


def test_paper_config_shapes_without_running_it():
  cfg = ml_collections.ConfigDict(dict(ch=128, ch_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
                                       attn_resolutions=(16,), dropout=0.0, scale_shift=False, edge_padding="zeros"))
  model = unet_from_config(cfg, out_channels=7, dtype="bfloat16")
  x = jax.ShapeDtypeStruct((2, 128, 128, 7), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  out = jax.eval_shape(model.apply, variables, x, t)
  assert (out.shape, out.dtype) == ((2, 128, 128, 7), jnp.float32)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert _param_count(model, (1, 128, 128, 7)) == _ddpm_unet_count(128, (1, 1, 2, 3, 4), 2, (16,), 128, 7, 7)
  # Attention only at 16 px: level 3 of 128 -> 64 -> 32 -> 16 -> 8, plus the middle.
  attn = sorted(k for k in variables["params"] if "attn" in k)
  assert attn == ["down3_attn0", "down3_attn1", "mid_attn", "up3_attn0", "up3_attn1", "up3_attn2"]


def test_unet_from_config_maps_fields_and_rejects_bad_dtype():
  cfg = ml_collections.ConfigDict(dict(ch=64, ch_mult=[1, 2], num_res_blocks=3, attn_resolutions=[8],
                                       dropout=0.1, scale_shift=True, edge_padding="reflect"))
  model = unet_from_config(cfg, out_channels=4, dtype=jnp.float32, self_condition=True, presence_classes=6)
  assert model == UNet(ch=64, ch_mult=(1, 2), num_res_blocks=3, attn_resolutions=(8,), dropout=0.1,
                       out_channels=4, dtype=jnp.float32, self_condition=True, presence_classes=6, scale_shift=True,
                       edge_padding="reflect")
  with pytest.raises(ValueError, match="float16"):
    unet_from_config(cfg, out_channels=4, dtype="float16")


def test_timestep_embedding_is_sin_cos_of_geometric_frequencies():
  emb = timestep_embedding(jnp.array([0, 7]), 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[0], np.r_[np.zeros(4), np.ones(4)], atol=1e-7)
  np.testing.assert_allclose(emb[1], np.r_[np.sin(7 * freqs), np.cos(7 * freqs)], rtol=1e-5, atol=1e-6)


def test_init_predicts_zero():
  # Zero-initialised output conv, as in the reference. One level keeps `init` cheap to compile.
  model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
               out_channels=5)
  x, t = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), x, t)
  np.testing.assert_array_equal(_apply(model)(variables, x, t), 0.0)


def test_tiny_forward_shape_and_dtype():
  model = UNet(dropout=0.0, **TINY)
  x, t = _inputs()
  variables = _random_variables(model, x, t)
  apply = _apply(model)
  out = apply(variables, x, t)
  assert (out.shape, out.dtype) == ((2, 16, 16, 5), jnp.float32)
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-2
  # The timestep reaches the output.
  assert not np.allclose(out, apply(variables, x, t + 1))


def test_bfloat16_compute_is_close_to_float32():
  x, t = _inputs()
  f32 = UNet(dropout=0.0, **TINY)
  bf16 = UNet(dropout=0.0, dtype=jnp.bfloat16, **TINY)
  variables = _random_variables(f32, x, t)
  assert jax.tree.structure(variables) == jax.tree.structure(_random_variables(bf16, x, t))
  ref = _apply(f32)(variables, x, t)
  out = _apply(bf16)(variables, x, t)
  assert out.dtype == jnp.float32
  rel = np.abs(np.asarray(out) - np.asarray(ref)) / float(jnp.std(ref))
  assert rel.mean() < 0.02 and rel.max() < 0.1


def test_dropout_is_active_only_in_training():
  model = UNet(dropout=0.5, **TINY)
  x, t = _inputs()
  variables = _random_variables(model, x, t)
  apply = _apply(model)
  eval_out = apply(variables, x, t)
  np.testing.assert_array_equal(eval_out, apply(variables, x, t, rngs={"dropout": jax.random.key(3)}))
  train = [apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(k)}) for k in (1, 1, 2)]
  np.testing.assert_array_equal(train[0], train[1])
  assert not np.allclose(train[0], train[2])
  assert not np.allclose(train[0], eval_out)


def test_cond_is_concatenated_to_the_input():
  model = UNet(dropout=0.0, **TINY)
  x, t = _inputs()
  cond = jax.random.normal(jax.random.key(5), (2, 16, 16, 4))
  variables = _random_variables(model, x, t, cond=cond)
  assert variables["params"]["conv_in"]["kernel"].shape == (3, 3, 3 + 4, 32)
  apply = _apply(model)
  out = apply(variables, x, t, cond=cond)
  assert out.shape == (2, 16, 16, 5)
  assert not np.allclose(out, apply(variables, x, t, cond=-cond))
  with pytest.raises(ValueError, match="cond shape"):
    apply(variables, x, t, cond=cond[:, :8, :8])


def test_self_cond_is_concatenated_and_defaults_to_zeros():
  model = UNet(dropout=0.0, self_condition=True, **TINY)
  x, t = _inputs()
  variables = _random_variables(model, x, t)
  assert variables["params"]["conv_in"]["kernel"].shape == (3, 3, 3 + 3, 32)  # x and its x0 estimate
  apply = _apply(model)
  estimate = jax.random.uniform(jax.random.key(6), x.shape, minval=-1, maxval=1)
  given = apply(variables, x, t, self_cond=estimate)
  assert not np.allclose(given, apply(variables, x, t, self_cond=-estimate))
  np.testing.assert_allclose(apply(variables, x, t), apply(variables, x, t, self_cond=jnp.zeros_like(x)), rtol=1e-6)
  with pytest.raises(ValueError, match="self_cond"):
    _apply(UNet(dropout=0.0, **TINY))(_random_variables(UNet(dropout=0.0, **TINY), x, t), x, t, self_cond=estimate)


def test_presence_code_enters_through_the_time_embedding():
  model = UNet(dropout=0.0, presence_classes=4, **TINY)
  x, t = _inputs()
  variables = _random_variables(model, x, t)
  assert variables["params"]["presence_dense"]["kernel"].shape == (4, 4 * 32)
  apply = _apply(model)
  code = jnp.array([[1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])
  asked = apply(variables, x, t, presence=code)
  assert not np.allclose(asked, apply(variables, x, t, presence=-code))  # the request changes the prediction
  # No presence: the all-zeros ("no condition") code, as condition dropout trains it.
  np.testing.assert_allclose(apply(variables, x, t), apply(variables, x, t, presence=jnp.zeros_like(code)), rtol=1e-6)
  with pytest.raises(ValueError, match="presence must have shape"):
    apply(variables, x, t, presence=code[:, :3])
  plain = UNet(dropout=0.0, **TINY)
  with pytest.raises(ValueError, match="presence given"):
    _apply(plain)(_random_variables(plain, x, t), x, t, presence=code)


def test_additive_time_conditioning_is_erased_by_one_channel_groups_and_scale_shift_keeps_it():
  """At 32 channels in 32 groups GroupNorm subtracts each channel's mean, so the reference's added time
  projection cannot change the output; ADM's scale and shift after the norm does."""
  one_level = dict(TINY, ch_mult=(1,), attn_resolutions=())
  x, _ = _inputs()
  early, late = jnp.array([10, 10]), jnp.array([900, 900])
  for scale_shift, sensitive in ((False, False), (True, True)):
    model = UNet(dropout=0.0, scale_shift=scale_shift, **one_level)
    variables = _random_variables(model, x, early)
    apply = _apply(model)
    moved = float(jnp.abs(apply(variables, x, early) - apply(variables, x, late)).max())
    assert (moved > 1e-3) == sensitive, (scale_shift, moved)
  wide = dict(one_level, ch=64)  # 2 channels per group: addition does reach the output
  model = UNet(dropout=0.0, **wide)
  variables = _random_variables(model, x, early)
  assert float(jnp.abs(_apply(model)(variables, x, early) - _apply(model)(variables, x, late)).max()) > 1e-3


def test_bad_inputs_are_named():
  model = UNet(dropout=0.0, **TINY)
  x, t = _inputs(shape=(2, 15, 15, 3))
  with pytest.raises(ValueError, match="divisible by 2"):
    model.init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="timesteps"):
    model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.zeros((3,), jnp.int32))
  narrow = UNet(dropout=0.0, **{**TINY, "ch": 16})
  with pytest.raises(ValueError, match="multiple of 32"):
    narrow.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("edge_padding", ["zeros", "reflect"])
def test_reflected_edges_see_a_uniform_image_as_uniform_where_zeros_make_a_border(edge_padding):
  """The input convolution of a flat image: reflected edges give the same features everywhere, zero padding
  gives the border pixels other values (what a briefly trained G drew as a frame). The parameters and the
  output's shape do not depend on the padding."""
  model = UNet(dropout=0.0, edge_padding=edge_padding, **TINY)
  x, t = jnp.full((2, 16, 16, 5), 0.7), jnp.array([3, 40])
  variables = _random_variables(model, x, t)
  assert jax.tree.structure(variables) == jax.tree.structure(_random_variables(UNet(dropout=0.0, **TINY), x, t))
  out, state = model.apply(variables, x, t, capture_intermediates=lambda mdl, _: mdl.name == "conv_in")
  features = np.asarray(state["intermediates"]["conv_in"]["__call__"][0])
  interior = features[:, 1:-1, 1:-1]
  np.testing.assert_allclose(interior, np.broadcast_to(interior[:, :1, :1], interior.shape), atol=1e-6)
  border_uniform = np.allclose(features, features[:, :1, :1], atol=1e-6)
  assert border_uniform == (edge_padding == "reflect")
  assert out.shape == (2, 16, 16, 5)
  with pytest.raises(ValueError, match="edge_padding must be one of"):
    UNet(dropout=0.0, edge_padding="wrap", **TINY).apply(variables, x, t)
