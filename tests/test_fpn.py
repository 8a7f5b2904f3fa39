"""Segmenters: FPN pyramid wiring, FPN and U-Net output shapes, BatchNorm modes, bf16, encoder features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satsynth_jax.models import fpn, resnet, unet_seg

TINY = (1, 1, 1, 1)
K = 5
# torchvision's published ResNet-50 size less its classifier fc (2048 x 1000 + 1000); the
# backbone's layer-by-layer count is checked in test_resnet.py.
RESNET50_BACKBONE = 25_557_032 - (2048 * 1000 + 1000)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _apply(model, variables, *args, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)


def _init(model, size=64):
  # An rbg key: compiling threefry for millions of parameters dominates a CPU init.
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.key(0, impl="rbg"), jnp.zeros((1, size, size, 3)))


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))


@pytest.fixture(scope="module")
def tiny_segmenters():
  models = {"fpn": fpn.FPNSegmenter(K, TINY), "unet": unet_seg.UNetSegmenter(K, TINY)}
  return {name: (model, _init(model)) for name, model in models.items()}


@pytest.fixture(params=["fpn", "unet"])
def segmenter(request, tiny_segmenters):
  return tiny_segmenters[request.param]


def test_fpn_resnet50_parameter_count():
  model = fpn.FPNSegmenter(num_classes=16)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 128, 128, 3)))
  counts = {name: _count(tree) for name, tree in variables["params"].items()}
  laterals = sum((c + 1) * 256 for c in (256, 512, 1024, 2048))
  outputs = 4 * (9 * 256 * 256 + 256)
  # Seven conv3x3 stages (P2: 1, P3: 1, P4: 2, P5: 3); the first of each level reads 256 channels.
  semantic = 4 * 9 * 256 * 128 + 3 * 9 * 128 * 128 + 7 * 2 * 128 + (128 + 1) * 16
  assert counts == {"backbone": RESNET50_BACKBONE, "fpn": laterals + outputs, "head": semantic}


def test_unet_resnet50_parameter_count():
  model = unet_seg.UNetSegmenter(num_classes=16)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 128, 128, 3)))
  counts = {name: _count(tree) for name, tree in variables["params"].items()}
  # Decoder block i: nearest x2, concat the skip, two bias-free conv3x3 + BatchNorm (scale, bias).
  # Widths from C5 = 2048: skips C4..C1 = 1024, 512, 256, 64, then none; outputs 256 .. 16.
  inputs = (2048 + 1024, 256 + 512, 128 + 256, 64 + 64, 32)
  decoders = {f"decoder{i}": 9 * cin * c + 2 * c + 9 * c * c + 2 * c
              for i, (cin, c) in enumerate(zip(inputs, (256, 128, 64, 32, 16)))}
  classifier = 9 * 16 * 16 + 16  # conv3x3 with bias to the 16 classes
  assert counts == {"backbone": RESNET50_BACKBONE, **decoders, "classifier": classifier}


def test_pyramid_is_top_down():
  model = fpn.FPN()
  rng = np.random.default_rng(0)
  features = {f"C{level}": rng.normal(size=(1, 2 ** (7 - level), 2 ** (7 - level), 8)).astype(np.float32)
              for level in fpn.LEVELS}
  variables = model.init(jax.random.key(0), features)
  pyramid = model.apply(variables, features)
  assert {k: v.shape for k, v in pyramid.items()} == {
      "P2": (1, 32, 32, 256), "P3": (1, 16, 16, 256), "P4": (1, 8, 8, 256), "P5": (1, 4, 4, 256)}
  changed = dict(features, C5=features["C5"] + 1.0)
  after = model.apply(variables, changed)
  assert all(not np.allclose(after[p], pyramid[p]) for p in ("P2", "P3", "P4", "P5"))  # C5 flows down
  changed = dict(features, C2=features["C2"] + 1.0)
  after = model.apply(variables, changed)
  np.testing.assert_array_equal(after["P3"], pyramid["P3"])  # nothing flows up
  assert not np.allclose(after["P2"], pyramid["P2"])


@pytest.mark.parametrize("height,width", [(64, 64), (72, 50)])
def test_logits_have_the_input_size(height, width):
  for model in (fpn.FPNSegmenter(K, TINY), unet_seg.UNetSegmenter(K, TINY)):
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               jnp.zeros((2, height, width, 3)))
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                            jnp.zeros((2, height, width, 3)))
    assert (logits.shape, logits.dtype) == ((2, height, width, K), jnp.float32)


def test_train_mode_normalises_with_batch_statistics(segmenter, images):
  model, variables = segmenter
  eval_logits = _apply(model, variables, images, train=False)
  train_logits, updates = _apply(model, variables, images, train=True, mutable=["batch_stats"])
  assert eval_logits.shape == train_logits.shape == (2, 64, 64, K)
  assert np.isfinite(train_logits).all() and np.isfinite(eval_logits).all()
  assert not np.allclose(train_logits, eval_logits)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(moved))
  # Eval mode is a pure function of the variables: same input, same logits.
  np.testing.assert_array_equal(_apply(model, variables, images, train=False), eval_logits)


def test_only_batch_norm_layers_keep_statistics(segmenter):
  model, variables = segmenter
  stats_modules = set(variables["batch_stats"])
  if isinstance(model, fpn.FPNSegmenter):
    assert stats_modules == {"backbone"}  # the head uses GroupNorm
  else:
    assert stats_modules == {"backbone"} | {f"decoder{i}" for i in range(5)}


def test_bfloat16_compute_is_close_to_float32(segmenter, images):
  model, variables = segmenter
  f32 = _apply(model, variables, images, train=False)
  bf16 = _apply(model.clone(dtype=jnp.bfloat16), variables, images, train=False)
  assert bf16.dtype == jnp.float32  # logits are returned in float32 for the loss
  rel = jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)
  assert rel < 0.05
  assert jnp.mean(jnp.argmax(bf16, -1) == jnp.argmax(f32, -1)) > 0.9


@pytest.mark.parametrize("architecture", ["unet", "fpn"])
def test_encoder_features_for_fid(tiny_segmenters, images, architecture):
  """Either segmenter can be the metric encoder: both give its backbone's pooled C5 and C3 channels."""
  model, variables = tiny_segmenters[architecture]
  logits, features = _apply(model, variables, images, train=False, return_features=True)
  np.testing.assert_array_equal(logits, _apply(model, variables, images, train=False))
  backbone_variables = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
  encoder = _apply(resnet.ResNet(TINY), backbone_variables, images, train=False)
  assert features["pooled"].shape == (2, 2048)
  np.testing.assert_allclose(features["pooled"], encoder["C5"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
  c3 = np.asarray(encoder["C3"])  # [2, 8, 8, 512] at 64 px
  assert features["spatial"].shape == (2, 8 * 8 * 7)
  np.testing.assert_allclose(features["spatial"], c3[..., :7].reshape(2, -1), rtol=1e-5, atol=1e-5)


def test_restoring_equal_segmenters_traces_their_shapes_once(monkeypatch):
  """An experiment restores the same segmenter for every evaluation and set score: its abstract variables
  are traced once per (model, size), and another size is traced anew."""
  from satsynth_jax import segmenter
  traced = []
  init = segmenter.init_variables
  monkeypatch.setattr(segmenter, "init_variables", lambda *a, **k: traced.append(1) or init(*a, **k))
  segmenter.abstract_variables.cache_clear()
  model = lambda: fpn.FPNSegmenter(K, TINY)  # equal, not identical, modules
  first = segmenter.abstract_variables(model(), 32)
  assert segmenter.abstract_variables(model(), 32) is first and len(traced) == 1
  assert first["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  segmenter.abstract_variables(model(), 64)
  assert len(traced) == 2
