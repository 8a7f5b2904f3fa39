"""ResNet backbone: ResNet-50 size, torchvision parity, BatchNorm modes, .safetensors weight loading."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from satsynth_jax.models import resnet
from tools.weights import convert_torchvision_resnet50 as convert
from tools.weights import torchvision_resnet50_digest as reference

TINY = (1, 1, 1, 1)
R50 = (3, 4, 6, 3)
HWIO_TO_OIHW = (3, 2, 0, 1)
OIHW_TO_HWIO = (2, 3, 1, 0)


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
  return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}


def _torchvision_shapes(stage_sizes) -> dict[str, tuple[int, ...]]:
  """torchvision's ResNet state dict less fc and counters, written out layer by layer from the paper's design."""
  shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
  in_ch = 64
  for stage, (blocks, width) in enumerate(zip(stage_sizes, (64, 128, 256, 512)), start=1):
    out = 4 * width
    for block in range(blocks):
      p = f"layer{stage}.{block}"
      shapes.update({f"{p}.conv1.weight": (width, in_ch, 1, 1), **_bn(f"{p}.bn1", width),
                     f"{p}.conv2.weight": (width, width, 3, 3), **_bn(f"{p}.bn2", width),
                     f"{p}.conv3.weight": (out, width, 1, 1), **_bn(f"{p}.bn3", out)})
      if block == 0:  # the first block changes width (and stride after stage 1): projection shortcut
        shapes.update({f"{p}.downsample.0.weight": (out, in_ch, 1, 1), **_bn(f"{p}.downsample.1", out)})
      in_ch = out
  return shapes


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_variables(stage_sizes=R50, size=64):
  init = functools.partial(resnet.ResNet(stage_sizes).init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _apply(model, variables, x, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def _random_state(stage_sizes, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(shape, np.float32) for k, shape in _torchvision_shapes(stage_sizes).items()}


def _write(path, state):
  save_file(state, path)
  return path


def _load(stage_sizes, path):
  abstract = _abstract_variables(stage_sizes)
  return resnet.load_pretrained(abstract["params"], abstract["batch_stats"], path)


def _load_error(stage_sizes, path) -> str:
  with pytest.raises(resnet.PretrainedWeightsError) as info:
    _load(stage_sizes, path)
  message = str(info.value)
  assert "\n" not in message and str(path) in message
  return message


@pytest.fixture(scope="module")
def tiny_variables():
  init = jax.jit(functools.partial(resnet.ResNet(TINY).init, train=False))
  # An rbg key: compiling threefry for ~8M parameters takes most of a CPU init's time.
  return init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
  """A ResNet-50 .safetensors as published (timm's resnet50.tv_in1k): backbone, classifier, no counters."""
  state = _random_state(R50)
  rng = np.random.default_rng(1)
  state.update({"fc.weight": rng.standard_normal((1000, 2048), np.float32),
                "fc.bias": rng.standard_normal(1000, np.float32)})
  return state, _write(tmp_path_factory.mktemp("r50") / "model.safetensors", state)


# ---- architecture ----

@pytest.mark.parametrize("stage_sizes", [R50, TINY, (2, 1, 3, 1)])
def test_variables_have_torchvision_names_and_shapes(stage_sizes):
  variables = _abstract_variables(stage_sizes)
  ours = {}
  for tree in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables[tree]):
      names = tuple(k.key for k in path)
      shape = tuple(leaf.shape[i] for i in HWIO_TO_OIHW) if names[-1] == "kernel" else leaf.shape
      ours[resnet.torchvision_key(names)] = shape
  assert ours == _torchvision_shapes(stage_sizes)


@pytest.mark.parametrize("stage_sizes", [R50, TINY])
def test_parameter_counts_follow_the_architecture(stage_sizes):
  shapes = _torchvision_shapes(stage_sizes)
  trainable = sum(int(np.prod(s)) for k, s in shapes.items() if "running_" not in k)
  norms = sum(k.endswith("running_mean") for k in shapes)
  variables = _abstract_variables(stage_sizes)
  assert _count(variables["params"]) == trainable
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * norms
  if stage_sizes == R50:
    # torchvision's published resnet50 size, 25,557,032, less fc (2048 * 1000 + 1000); 1 + 3 * 16 + 4 norms.
    assert trainable == 25_557_032 - 2_049_000 and norms == 53


def test_feature_shapes_follow_torch_rounding_on_odd_sizes():
  variables = _abstract_variables()
  apply = functools.partial(resnet.ResNet().apply, train=False)
  features = jax.eval_shape(apply, variables, jnp.zeros((2, 65, 100, 3)))
  # torch: out = floor((in + 2 pad - k) / s) + 1 at every strided conv and the max pool.
  expected = {"C1": (33, 50, 64), "C2": (17, 25, 256), "C3": (9, 13, 512),
              "C4": (5, 7, 1024), "C5": (3, 4, 2048)}
  assert {k: v.shape[1:] for k, v in features.items()} == expected
  assert features["C5"].dtype == jnp.float32


# ---- torchvision parity ----

# Produced by torchvision 0.28.0 (torch 2.13.0+cpu, CPU) with tools/weights/torchvision_resnet50_digest.py
# (the same values came from torchvision 0.29.1 / torch 2.14.1): torchvision's ResNet with one
# bottleneck per stage, reference_weights under its state-dict names, reference_input.
TORCHVISION_DIGEST = {
    "C1": (0.3415, 0.530001, 0.738401, 1.17579),
    "C2": (1.45019, 1.43333, 2.42748, 3.50052),
    "C3": (2.56307, 3.22621, 3.8432, 5.88494),
    "C4": (4.64517, 7.02102, 6.45034, 10.06),
    "C5": (7.03959, 9.57136, 8.29183, 12.5746),
}


def test_forward_matches_torchvision_with_the_same_weights(tiny_variables, tmp_path):
  assert reference.STAGE_SIZES == TINY
  path = _write(tmp_path / "reference.safetensors", reference.reference_weights(_torchvision_shapes(TINY)))
  # Concrete trees work as targets too, not only eval_shape's.
  params, stats = resnet.load_pretrained(tiny_variables["params"], tiny_variables["batch_stats"], path)
  features = _apply(resnet.ResNet(TINY), {"params": params, "batch_stats": stats},
                    reference.reference_input(), train=False)
  digest = reference.digest({k: np.asarray(v) for k, v in features.items()})
  for level, expected in TORCHVISION_DIGEST.items():
    np.testing.assert_allclose(digest[level], expected, rtol=1e-4, err_msg=level)


def test_digest_constant_regenerates_from_torchvision():
  pytest.importorskip("torch")
  try:
    import torchvision  # noqa: F401
  except ImportError:
    pytest.skip("needs torchvision (pip install -e .[bench])")
  except RuntimeError as e:  # e.g. PyPI's CUDA torchvision beside a CPU-only torch
    pytest.skip(f"torchvision does not load beside this torch: {e}")
  digest = reference.torchvision_digest()
  assert digest.keys() == TORCHVISION_DIGEST.keys()
  for level, expected in TORCHVISION_DIGEST.items():
    np.testing.assert_allclose(digest[level], expected, rtol=1e-5, err_msg=level)


# ---- BatchNorm and dtypes ----

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


# ---- loading .safetensors ----

def _assert_loaded_equal_file(params, stats, state):
  """Every variable equals its file tensor (kernels OIHW -> HWIO), all float32 jax arrays."""
  assert jax.tree.leaves(params) and jax.tree.leaves(stats)
  for tree in (params, stats):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      names = tuple(k.key for k in path)
      key = resnet.torchvision_key(names)
      expected = state[key].transpose(OIHW_TO_HWIO) if names[-1] == "kernel" else state[key]
      assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32, key
      np.testing.assert_array_equal(leaf, expected, err_msg=key)
  # Spelled out, so a name mapping that pairs the wrong tensors cannot pass the loop above.
  np.testing.assert_array_equal(params["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["bn1"]["scale"], state["bn1.weight"])
  np.testing.assert_array_equal(params["layer1_0"]["bn3"]["bias"], state["layer1.0.bn3.bias"])
  np.testing.assert_array_equal(params["layer2_0"]["downsample_conv"]["kernel"],
                                state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["layer4_0"]["downsample_bn"]["var"],
                                state["layer4.0.downsample.1.running_var"])
  np.testing.assert_array_equal(stats["layer3_0"]["bn2"]["mean"], state["layer3.0.bn2.running_mean"])


def test_resnet50_file_loads_every_tensor_and_ignores_the_classifier(r50_file):
  state, path = r50_file
  params, stats = _load(R50, path)
  _assert_loaded_equal_file(params, stats, state)
  np.testing.assert_array_equal(params["layer3_5"]["conv2"]["kernel"],
                                state["layer3.5.conv2.weight"].transpose(2, 3, 1, 0))


def test_state_dict_export_round_trips_exactly(tiny_variables, tmp_path):
  state = resnet.torchvision_state_dict(tiny_variables["params"], tiny_variables["batch_stats"])
  assert {k: v.shape for k, v in state.items()} == _torchvision_shapes(TINY)
  np.testing.assert_array_equal(state["conv1.weight"],
                                np.transpose(tiny_variables["params"]["conv1"]["kernel"], HWIO_TO_OIHW))
  params, stats = _load(TINY, _write(tmp_path / "export.safetensors", state))
  jax.tree.map(np.testing.assert_array_equal, params, tiny_variables["params"])
  jax.tree.map(np.testing.assert_array_equal, stats, tiny_variables["batch_stats"])


def test_tiny_file_loads_with_counters_and_half_precision(tmp_path):
  state = _random_state(TINY)
  state["layer4.0.bn1.weight"] = state["layer4.0.bn1.weight"].astype(np.float16)
  written = dict(state, **{"bn1.num_batches_tracked": np.array(7, np.int64),
                           "layer1.0.bn1.num_batches_tracked": np.array(7, np.int64)})
  params, stats = _load(TINY, _write(tmp_path / "tiny.safetensors", written))
  state["layer4.0.bn1.weight"] = state["layer4.0.bn1.weight"].astype(np.float32)
  _assert_loaded_equal_file(params, stats, state)


def test_truncated_backbone_takes_the_leading_blocks_of_a_resnet50_file(r50_file):
  state, path = r50_file
  params, stats = _load((2, 1, 3, 1), path)
  _assert_loaded_equal_file(params, stats, state)
  assert "layer1_1" in params and "layer1_2" not in params and "layer3_2" in params


def test_deeper_or_foreign_keys_are_refused(r50_file, tmp_path):
  state, _ = r50_file
  deeper = dict(state, **{"layer3.6.conv1.weight": np.zeros((256, 1024, 1, 1), np.float32)})
  path = _write(tmp_path / "r101ish.safetensors", deeper)
  assert "'layer3.6.conv1.weight'" in _load_error(R50, path)
  # Beyond ResNet-50 depth is refused for a truncated backbone too: the file is no ResNet-50.
  assert "'layer3.6.conv1.weight'" in _load_error(TINY, path)
  foreign = dict(_random_state(TINY), **{"head.weight": np.zeros(3, np.float32)})
  message = _load_error(TINY, _write(tmp_path / "foreign.safetensors", foreign))
  assert "'head.weight'" in message and "unused keys: 1;" in message


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
  state = _random_state(TINY)
  state["layer3.0.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  message = _load_error(TINY, _write(tmp_path / "bad.safetensors", state))
  assert "'layer3.0.conv2.weight' has shape (256, 256, 1, 1), the backbone needs (256, 256, 3, 3)" in message


def test_missing_tensors_name_the_first_and_count_them(tmp_path):
  state = _random_state(TINY)
  del state["layer1.0.bn3.running_mean"]
  message = _load_error(TINY, _write(tmp_path / "missing.safetensors", state))
  total = len(_torchvision_shapes(TINY))
  assert f"missing key 'layer1.0.bn3.running_mean' (1 of the backbone's {total} tensors are missing)" in message
  # A test-sized file is no ResNet-50: every block past the first of each stage is missing.
  message = _load_error(R50, _write(tmp_path / "tiny.safetensors", _random_state(TINY)))
  r50_total = len(_torchvision_shapes(R50))
  assert f"missing key 'layer1.1.bn1.bias' ({r50_total - total} of the backbone's {r50_total}" in message


def test_foreign_names_are_reported_with_an_example(tmp_path):
  state = {f"module.{k}": v for k, v in _random_state(TINY).items()}
  message = _load_error(TINY, _write(tmp_path / "wrapped.safetensors", state))
  assert "missing key 'bn1.bias'" in message and "first key is 'module.bn1.bias'" in message


def test_non_float_or_non_finite_tensors_are_refused(tmp_path):
  state = _random_state(TINY)
  state["layer2.0.bn1.running_var"] = np.ones(128, np.int32)
  assert "'layer2.0.bn1.running_var' has dtype int32" in _load_error(
      TINY, _write(tmp_path / "int.safetensors", state))
  state = _random_state(TINY)
  state["layer2.0.conv1.weight"][0, 0, 0, 0] = np.nan
  assert "'layer2.0.conv1.weight' has non-finite values" in _load_error(
      TINY, _write(tmp_path / "nan.safetensors", state))


@pytest.mark.parametrize("content", [None, b"", b"not a safetensors file", b"PK\x03\x04 an old .npz"])
def test_unreadable_files_are_one_line_errors(tmp_path, content):
  path = tmp_path / "weights.safetensors"
  if content is not None:
    path.write_bytes(content)
  message = _load_error(TINY, path)
  assert ("no such pretrained weights file" if content is None else "not a readable .safetensors file") in message


# ---- tools/weights/convert_torchvision_resnet50.py ----

def test_converter_writes_only_files_the_backbone_accepts(tmp_path):
  state = _random_state(TINY)
  output = tmp_path / "tiny.safetensors"
  convert.write_checked_safetensors(state, str(output), stage_sizes=TINY)
  params, stats = _load(TINY, output)
  _assert_loaded_equal_file(params, stats, state)
  # A tiny net's weights are no ResNet-50: refused, and nothing is left behind.
  with pytest.raises(resnet.PretrainedWeightsError, match="missing key"):
    convert.write_checked_safetensors(state, str(tmp_path / "r50.safetensors"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_converter_reads_a_torch_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  state = _random_state(TINY)
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  # A transposed view, as a .pth may hold: it must come out contiguous for safetensors.
  tensors["conv1.weight"] = torch.from_numpy(state["conv1.weight"].transpose(1, 0, 2, 3).copy()).transpose(0, 1)
  tensors["bn1.num_batches_tracked"] = torch.tensor(3)
  torch.save(tensors, tmp_path / "tiny.pth")
  arrays = convert.read_torch_state_dict(str(tmp_path / "tiny.pth"))
  assert arrays.keys() == state.keys()
  convert.write_checked_safetensors(arrays, str(tmp_path / "tiny.safetensors"), stage_sizes=TINY)
  params, stats = _load(TINY, tmp_path / "tiny.safetensors")
  _assert_loaded_equal_file(params, stats, state)
