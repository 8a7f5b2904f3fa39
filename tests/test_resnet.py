"""ResNet backbone: ResNet-50 size, torchvision parity, BatchNorm modes, weight file round trip."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satsynth_jax.models import resnet
from tools import convert_torchvision_resnet50 as convert

TINY = (1, 1, 1, 1)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_variables(stage_sizes=resnet.RESNET50_STAGES, size=64):
  init = functools.partial(resnet.ResNet(stage_sizes).init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _apply(model, variables, x, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


@pytest.fixture(scope="module")
def tiny_variables():
  init = jax.jit(functools.partial(resnet.ResNet(TINY).init, train=False))
  # An rbg key: compiling threefry for ~8M parameters takes most of a CPU init's time.
  return init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))


def test_resnet50_parameter_count_matches_torchvision_without_classifier():
  variables = _abstract_variables()
  # torchvision resnet50: 25,557,032 parameters, minus fc (2048 * 1000 + 1000).
  assert _count(variables["params"]) == 25_557_032 - 2_049_000 == 23_508_032
  # 53 BatchNorms, each with running mean and var.
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 53


def test_feature_shapes_follow_torch_rounding_on_odd_sizes():
  variables = _abstract_variables()
  apply = functools.partial(resnet.ResNet().apply, train=False)
  features = jax.eval_shape(apply, variables, jnp.zeros((2, 65, 100, 3)))
  # torch: out = floor((in + 2 pad - k) / s) + 1 at every strided conv and the max pool.
  expected = {"C1": (33, 50, 64), "C2": (17, 25, 256), "C3": (9, 13, 512),
              "C4": (5, 7, 1024), "C5": (3, 4, 2048)}
  assert {k: v.shape[1:] for k, v in features.items()} == expected
  assert features["C5"].dtype == jnp.float32


def _reference_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Deterministic weights keyed by torchvision name, drawn identically in the torch snippet below."""
  rng = np.random.default_rng(0)
  weights = {}
  for key in sorted(shapes):
    shape = shapes[key]
    if key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1):
      weights[key] = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
      weights[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    else:
      weights[key] = rng.uniform(-0.2, 0.2, shape)
  return {k: v.astype(np.float32) for k, v in weights.items()}


# Produced by torchvision 0.29.1 (torch 2.14.1, CPU):
#   m = torchvision.models.resnet.ResNet(Bottleneck, [1, 1, 1, 1]).eval()
#   m.load_state_dict(_reference_weights(shapes of m.state_dict() less fc and counters), strict=False)
#   x = np.random.default_rng(1).uniform(size=(1, 37, 45, 3)); normalise with ImageNet mean/std;
#   run conv1/bn1/relu (C1), maxpool, layer1..layer4 (C2..C5); NHWC f ->
#   (f[0, 0, 0].mean(), f[0, -1, -1].mean(), f.mean(), f.std())
TORCHVISION_DIGEST = {
    "C1": (0.3415, 0.530001, 0.738401, 1.17579),
    "C2": (1.45019, 1.43333, 2.42748, 3.50052),
    "C3": (2.56307, 3.22621, 3.8432, 5.88494),
    "C4": (4.64517, 7.02102, 6.45034, 10.06),
    "C5": (7.03959, 9.57136, 8.29183, 12.5746),
}


def test_forward_matches_torchvision_with_the_same_weights(tiny_variables, tmp_path):
  shapes = {k: v.shape for k, v in resnet.torchvision_state_dict(
      tiny_variables["params"], tiny_variables["batch_stats"]).items()}
  np.savez(tmp_path / "reference.npz", **_reference_weights(shapes))
  params, stats = resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"],
                                         tmp_path / "reference.npz")
  x = np.random.default_rng(1).uniform(size=(1, 37, 45, 3)).astype(np.float32)
  features = _apply(resnet.ResNet(TINY), {"params": params, "batch_stats": stats}, x, train=False)
  for level, expected in TORCHVISION_DIGEST.items():
    f = np.asarray(features[level])
    digest = (f[0, 0, 0].mean(), f[0, -1, -1].mean(), f.mean(), f.std())
    np.testing.assert_allclose(digest, expected, rtol=1e-4, err_msg=level)


def test_train_mode_uses_batch_statistics_and_updates_running_averages(tiny_variables):
  model = resnet.ResNet(TINY)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  train_out, updates = _apply(model, tiny_variables, x, train=True, mutable=["batch_stats"])
  eval_out = _apply(model, tiny_variables, x, train=False)
  # Fresh running stats are (0, 1): eval leaves activations unnormalised, train does not.
  assert not np.allclose(train_out["C5"], eval_out["C5"])
  old_mean = tiny_variables["batch_stats"]["bn1"]["mean"]
  new_mean = updates["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(old_mean, new_mean)
  # momentum 0.9 (torch's 0.1): the new running mean is 0.1 of the batch mean of the stem conv.
  params = tiny_variables["params"]
  normalised = (x - jnp.asarray(resnet.IMAGENET_MEAN)) / jnp.asarray(resnet.IMAGENET_STD)
  conv = jax.lax.conv_general_dilated(normalised, params["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new_mean, 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(tiny_variables, x, train=True)  # batch_stats must be declared mutable in train


def test_bfloat16_compute_keeps_float32_variables_and_stays_close(tiny_variables):
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  f32 = _apply(resnet.ResNet(TINY), tiny_variables, x, train=False)
  bf16_model = resnet.ResNet(TINY, dtype=jnp.bfloat16)
  bf16 = _apply(bf16_model, tiny_variables, x, train=False)
  assert bf16["C5"].dtype == jnp.bfloat16
  rel = jnp.linalg.norm(bf16["C5"].astype(jnp.float32) - f32["C5"]) / jnp.linalg.norm(f32["C5"])
  assert rel < 0.03
  _, updates = _apply(bf16_model, tiny_variables, x, train=True, mutable=["batch_stats"])
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_torchvision_export_uses_torch_names_and_layouts(tiny_variables):
  state = resnet.torchvision_state_dict(tiny_variables["params"], tiny_variables["batch_stats"])
  assert state["conv1.weight"].shape == (64, 3, 7, 7)  # OIHW
  assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
  assert state["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
  assert state["layer4.0.downsample.1.running_var"].shape == (2048,)
  np.testing.assert_array_equal(state["conv1.weight"],
                                np.transpose(tiny_variables["params"]["conv1"]["kernel"], (3, 2, 0, 1)))


def test_export_then_load_round_trips_exactly(tiny_variables, tmp_path):
  path = tmp_path / "tiny.npz"
  resnet.export_torchvision_npz(tiny_variables["params"], tiny_variables["batch_stats"], path)
  zeros = jax.tree.map(jnp.zeros_like, tiny_variables)
  params, stats = resnet.load_pretrained(zeros["params"], zeros["batch_stats"], path)
  jax.tree.map(np.testing.assert_array_equal, params, tiny_variables["params"])
  jax.tree.map(np.testing.assert_array_equal, stats, tiny_variables["batch_stats"])


def _write_state(path, state):
  np.savez(path, **state)
  return path


def test_load_names_a_key_with_the_wrong_shape(tiny_variables, tmp_path):
  state = resnet.torchvision_state_dict(tiny_variables["params"], tiny_variables["batch_stats"])
  state["layer3.0.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  path = _write_state(tmp_path / "bad.npz", state)
  with pytest.raises(resnet.PretrainedWeightsError,
                     match=r"layer3\.0\.conv2\.weight.*\(256, 256, 1, 1\).*\(256, 256, 3, 3\)"):
    resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"], path)


def test_load_names_a_missing_key_and_refuses_extra_blocks(tiny_variables, tmp_path):
  state = resnet.torchvision_state_dict(tiny_variables["params"], tiny_variables["batch_stats"])
  missing = dict(state)
  del missing["layer1.0.bn3.running_mean"]
  with pytest.raises(resnet.PretrainedWeightsError, match=r"missing key 'layer1\.0\.bn3\.running_mean'"):
    resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"],
                           _write_state(tmp_path / "missing.npz", missing))
  deeper = dict(state, **{"layer1.1.conv1.weight": np.zeros((64, 256, 1, 1), np.float32)})
  with pytest.raises(resnet.PretrainedWeightsError, match=r"layer1\.1\.conv1\.weight.*stage_sizes"):
    resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"],
                           _write_state(tmp_path / "deeper.npz", deeper))


def test_load_ignores_classifier_and_step_counters(tiny_variables, tmp_path):
  state = resnet.torchvision_state_dict(tiny_variables["params"], tiny_variables["batch_stats"])
  state.update({"fc.weight": np.zeros((1000, 2048), np.float32), "fc.bias": np.zeros(1000, np.float32),
                "bn1.num_batches_tracked": np.array(5)})
  params, _ = resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"],
                                     _write_state(tmp_path / "full.npz", state))
  np.testing.assert_array_equal(params["bn1"]["scale"], tiny_variables["params"]["bn1"]["scale"])


def test_load_reports_an_unreadable_file(tiny_variables, tmp_path):
  path = tmp_path / "not_npz.npz"
  path.write_text("not a zip")
  with pytest.raises(resnet.PretrainedWeightsError, match="not_npz.npz"):
    resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"], path)


def test_converter_writes_only_files_the_backbone_accepts(tiny_variables, tmp_path):
  state = resnet.torchvision_state_dict(tiny_variables["params"], tiny_variables["batch_stats"])
  output = tmp_path / "tiny.npz"
  convert.write_checked_npz(state, str(output), stage_sizes=TINY)
  params, _ = resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"], output)
  np.testing.assert_array_equal(params["conv1"]["kernel"], tiny_variables["params"]["conv1"]["kernel"])
  # A tiny net's weights are no ResNet-50: refused, and nothing is left behind.
  with pytest.raises(resnet.PretrainedWeightsError, match="missing key"):
    convert.write_checked_npz(state, str(tmp_path / "r50.npz"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz"]
