"""The segmenter: overfits the demo, mixes exactly R x |D| synthetic pairs, resumes exactly, runs from the CLI.

Training runs go through the command line, as a user starts them, on one CPU device (four
virtual devices on two shared cores only add all-reduce copies) and with one persistent
compilation cache: the runs compile the same programs, so XLA builds them once.
"""

import functools
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from conftest import TINY_SEGMENTER_RUN, load_config, prepared_demo
from satsynth_jax import resolved, segmenter
from satsynth_jax.data import records
from satsynth_jax.infra import checkpoint, identity, parallel, workdir as layout
from satsynth_jax.jobs import train_segmentation
from satsynth_jax.metrics import segmentation as seg_metrics
from satsynth_jax.models import resnet
from satsynth_jax.train import optim, segmentation
from satsynth_jax.train.state import TrainState

NUM_TRAIN = 4
SIZE = 16


@pytest.fixture(scope="module")
def trained(segmenter_cli, tmp_path_factory):
  """The demo prepared and a real-only (R=0) run trained for 30 steps with --mode=train_segmentation."""
  config, workdir = prepared_demo(tmp_path_factory, "seg", TINY_SEGMENTER_RUN)
  segmenter_cli("train_segmentation", workdir)
  return config, workdir


def assert_loss_finite_and_falling(log: list[dict]) -> None:
  """Every logged loss finite; the mean of the later half below the mean of the earlier half."""
  losses = np.array([entry["loss"] for entry in log], np.float64)
  assert len(losses) >= 2 and np.isfinite(losses).all(), losses
  half = len(losses) // 2
  assert losses[-half:].mean() < losses[:half].mean(), losses


def write_synthetic(directory, config, count: int) -> None:
  """`count` flat grey pairs; pair i's pixels all hold 100 + i, so a batch row tells which pair it is."""
  d = config.data
  pairs = (records.Pair(image=np.full((SIZE, SIZE, 3), 100 + i, np.uint8), mask=np.full((SIZE, SIZE), i % 2, np.uint8),
                        id=f"synthetic_{i:03d}", source="synthetic:0", num_classes=d.num_classes)
           for i in range(count))
  records.write_records(directory, pairs, num_classes=d.num_classes, class_names=list(d.class_names),
                        source="synthetic:0", examples_per_shard=5)


@pytest.fixture(scope="module")
def synthetic_dir(trained, tmp_path_factory):
  """12 synthetic pairs: 3 x |D|."""
  directory = str(tmp_path_factory.mktemp("synthetic"))
  write_synthetic(directory, trained[0], 3 * NUM_TRAIN)
  return directory


def mixed(synthetic_dir, ratio: int, **overrides) -> dict:
  """Overrides for a run on D u D' (augmentation on, so resuming must replay it too)."""
  return {"data.synthetic_ratio": ratio, "data.synthetic_dir": synthetic_dir, "data.augment": True, **overrides}


def copy_data(workdir, tmp_path) -> str:
  shutil.copytree(os.path.join(workdir, "data"), tmp_path / "data")
  return str(tmp_path)


def test_run_names_separate_architectures_ratios_mixes_and_seeds():
  assert resolved.SegmenterRun.from_config(load_config("demo")).name == "fpn_r0_s0"
  run = resolved.SegmenterRun.from_config(load_config("demo", **{"segmentation.architecture": "unet",
                                                          "data.synthetic_ratio": 3, "seed": 2}))
  assert run == resolved.SegmenterRun("unet_r3_diffusion_x0_s2", "unet", 3, 2, "diffusion_x0")
  # Another synthetic share of each batch is another run in the same workdir, not a refused one.
  name = lambda **kw: resolved.SegmenterRun.from_config(load_config("demo", **kw)).name  # noqa: E731
  assert name(**{"data.synthetic_ratio": 2, "data.synthetic_fraction": 0.25}) == "fpn_r2_diffusion_x0_mix25_s0"
  assert name(**{"data.synthetic_fraction": 0.25}) == "fpn_r0_s0"  # D has no synthetic share


def _model_and_state(config, rng=0):
  model = segmenter.build(config, config.segmentation.architecture)
  init = functools.partial(segmentation.init_state, model, config.data.image_size, config.segmentation.train)
  return model, init


def test_cross_entropy_and_accuracy_skip_no_data_pixels():
  logits = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]], np.float32))  # [1, 3, K]
  labels = np.array([[0, 2, 255]])
  loss, accuracy = segmentation.masked_cross_entropy(logits, labels, ignore_index=255)
  np.testing.assert_allclose(loss, -(np.log(0.7) + np.log(0.1)) / 2, rtol=1e-6)
  assert accuracy == 0.5
  loss, accuracy = segmentation.masked_cross_entropy(logits, np.full((1, 3), 255), ignore_index=255)
  assert loss == 0 and accuracy == 0


@pytest.mark.parametrize("head", ["fpn", "unet"])
def test_train_step_traces_for_both_heads(head):
  """Shapes only (jax.eval_shape): the step's state keeps its structure and reports its metrics."""
  config = load_config("demo", **{**TINY_SEGMENTER_RUN, "segmentation.architecture": head})
  model, init = _model_and_state(config)
  state = jax.eval_shape(lambda: init(jax.random.key(0)))
  batch = {"image": jax.ShapeDtypeStruct((4, SIZE, SIZE, 3), np.float32),
           "mask": jax.ShapeDtypeStruct((4, SIZE, SIZE), np.int32), "is_synthetic": jax.ShapeDtypeStruct((4,), bool)}
  _, lr = optim.make_optimizer(config.segmentation.train)
  new_state, metrics = jax.eval_shape(functools.partial(segmentation.train_step, model=model, ignore_index=255,
                                                        lr_schedule=lr), state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state) and state.batch_stats
  assert jax.tree.map(lambda x: x.shape, new_state.params) == jax.tree.map(lambda x: x.shape, state.params)
  assert set(metrics) == {"loss", "pixel_accuracy", "lr", "grad_norm", "synthetic_fraction"}


def test_segmenter_overfits_the_demo_train_split(trained):
  config, workdir = trained
  mesh = parallel.make_mesh()
  model, variables, step = segmenter.restore(config, workdir, resolved.SegmenterRun.from_config(config), mesh)
  result = segmenter.evaluate_split(config, model, variables, os.path.join(workdir, "data", "train"), mesh)
  scores = seg_metrics.segmentation_scores(result.confusion, config.data.class_names)
  assert step == 30 and result.num_examples == NUM_TRAIN
  assert result.confusion.sum() == NUM_TRAIN * SIZE * SIZE
  assert scores["miou"] > 0.9, scores
  log = [json.loads(line) for line in open(os.path.join(workdir, "metrics", "unet_r0_s0.jsonl"))]
  assert [entry["step"] for entry in log] == [10, 15, 20, 30]  # log_every and checkpoint steps
  assert_loss_finite_and_falling(log)
  assert log[-1]["loss"] < log[0]["loss"] / 3
  assert all(entry["synthetic_fraction"] == 0.0 for entry in log)


def test_a_run_resumed_at_another_data_image_size_is_refused_naming_its_input_size(trained):
  """segmentation.image_size=0 follows data.image_size: the run trained at 16 px is not resumed at 8 px
  (its weights would fit, so only the recorded input size can tell)."""
  config, workdir = trained
  smaller = load_config("demo", **{**TINY_SEGMENTER_RUN, "data.image_size": 8,
                                   "segmentation.train.num_steps": 40})
  with pytest.raises(identity.SettingsMismatchError, match=r"run 'unet_r0_s0' was made with other settings "
                                                           r"\(input_size: 16 -> 8\)"):
    train_segmentation.run(smaller, workdir)
  assert checkpoint.latest_step(layout.checkpoint_dir(workdir, "unet_r0_s0")) == 30


def test_only_the_first_r_times_d_synthetic_pairs_join_training(trained, synthetic_dir):
  config = load_config("demo", **{**TINY_SEGMENTER_RUN, **mixed(synthetic_dir, 2)})
  synth_dir, count, _ = segmentation.synthetic_source(config, trained[1], 2, synthetic_dir)
  assert (synth_dir, count) == (synthetic_dir, 2 * NUM_TRAIN)
  run = resolved.SegmenterRun.from_config(config)
  batches = segmentation.make_task(config, trained[1], parallel.make_mesh(), run, synthetic_dir).make_batches()
  seen = []
  for _ in range(12):
    batch = next(batches)
    assert batch["is_synthetic"].sum() == 2  # synthetic_fraction 0.5 of every batch of 4
    seen += [round(image[0, 0, 0] * 255) - 100 for image in batch["image"][batch["is_synthetic"]]]
  assert set(seen) == set(range(2 * NUM_TRAIN))  # 12 on disk; pairs 8..11 are never drawn


def test_synthetic_pairs_of_another_size_are_refused_unless_resizing_is_asked_for(trained, synthetic_dir):
  config = load_config("demo", **{**TINY_SEGMENTER_RUN, **mixed(synthetic_dir, 2),
                                  "segmentation.image_size": 32})
  with pytest.raises(segmentation.SyntheticSizeError, match=r"pairs are 16x16 px but the segmenter's input is 32 px"):
    segmentation.synthetic_source(config, trained[1], 2, synthetic_dir)
  config.segmentation.resize_synthetic = True
  assert segmentation.synthetic_source(config, trained[1], 2, synthetic_dir)[1] == 2 * NUM_TRAIN


def test_asking_for_more_synthetic_pairs_than_exist_fails_before_training(trained, synthetic_dir, tmp_path):
  config = load_config("demo", **{**TINY_SEGMENTER_RUN, **mixed(synthetic_dir, 4)})
  with pytest.raises(segmentation.NotEnoughSyntheticDataError,
                     match=rf"synthetic_ratio=4 needs 4 x 4 = 16 synthetic pairs .* {synthetic_dir} holds 12"):
    train_segmentation.run(config, copy_data(trained[1], tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_resumed_mixed_run_equals_uninterrupted_run(segmenter_cli, trained, synthetic_dir, tmp_path):
  """4 steps in one go vs the same run restarted from its step-2 checkpoint, mixing and augmenting."""
  straight = copy_data(trained[1], tmp_path / "straight")
  overrides = mixed(synthetic_dir, 2, **{"segmentation.train.num_steps": 4, "segmentation.train.log_every": 1,
                                         "segmentation.train.checkpoint_every": 2})
  segmenter_cli("train_segmentation", straight, overrides)
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  config, mesh = load_config("demo", **{**TINY_SEGMENTER_RUN, **overrides}), parallel.make_mesh()
  run = resolved.SegmenterRun.from_config(config)
  assert run.name == f"unet_r2_{os.path.basename(synthetic_dir)}_s0"
  shutil.rmtree(resumed / "checkpoints" / run.name / "4")  # as if stopped right after step 2
  segmenter_cli("train_segmentation", resumed, overrides)
  (_, expected, step_a), (_, actual, step_b) = (segmenter.restore(config, w, run, mesh)
                                                for w in (straight, resumed))
  assert step_a == step_b == 4
  expected = traverse_util.flatten_dict(parallel.to_host(expected))
  actual = traverse_util.flatten_dict(parallel.to_host(actual))
  assert expected.keys() == actual.keys() and any(path[0] == "batch_stats" for path in expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(value, actual[path], err_msg="/".join(path))
  log = [json.loads(line) for line in open(os.path.join(straight, "metrics", f"{run.name}.jsonl"))]
  assert [entry["synthetic_fraction"] for entry in log] == [0.5] * 4
  assert_loss_finite_and_falling(log)
  resumed_log = [json.loads(line) for line in open(resumed / "metrics" / f"{run.name}.jsonl")]
  # The copied log's steps past the restored checkpoint are dropped, so the resumed log reads as one run.
  assert [entry["step"] for entry in resumed_log] == [1, 2, 3, 4]
  assert resumed_log == log


def random_variables(model, size: int, seed: int) -> dict:
  """{"params", "batch_stats"} of `model` drawn in NumPy: its initialisers take ~20 s to compile on CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False))

  def draw(path, leaf):
    if path[-1].key == "var":
      return np.ones(leaf.shape, np.float32)
    return rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_pretrained_backbone_replaces_the_random_one(tmp_path, monkeypatch):
  config = load_config("demo", **TINY_SEGMENTER_RUN)
  weights = random_variables(resnet.ResNet((1, 1, 1, 1)), SIZE, seed=7)
  path = tmp_path / "resnet.safetensors"
  save_file(resnet.torchvision_state_dict(weights["params"], weights["batch_stats"]), str(path))
  config.segmentation.pretrained_path = str(path)
  model = segmenter.build(config, config.segmentation.architecture)
  monkeypatch.setattr(segmenter, "init_variables", lambda model, size, rng: random_variables(model, SIZE, 0))
  state = segmentation.init_state(model, SIZE, config.segmentation.train, jax.random.key(0),
                                  backbone=segmentation.load_backbone(config, model))
  for ours, theirs in ((state.params["backbone"], weights["params"]),
                       (state.batch_stats["backbone"], weights["batch_stats"])):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_array_equal(a, b)
  decoder = random_variables(model, SIZE, 0)["params"]["decoder0"]
  for a, b in zip(jax.tree.leaves(state.params["decoder0"]), jax.tree.leaves(decoder)):
    np.testing.assert_array_equal(a, b)


def test_missing_pretrained_file_is_named(tmp_path):
  missing = str(tmp_path / "nope.safetensors")
  config = load_config("demo", **{**TINY_SEGMENTER_RUN, "segmentation.pretrained_path": missing})
  with pytest.raises(resnet.PretrainedWeightsError,
                     match=rf"segmentation.pretrained_path: {missing}: no such pretrained weights file"):
    segmentation.load_backbone(config, segmenter.build(config, "unet"))


def test_cli_evaluates_the_trained_run(segmenter_cli, trained):
  config, workdir = trained
  stdout = segmenter_cli("evaluate", workdir)
  summary = json.loads(open(os.path.join(workdir, "metrics", "eval_unet_r0_s0.json")).read())
  assert summary["checkpoint_step"] == 30
  assert summary["splits"]["val"]["num_examples"] == 8 and summary["splits"]["test"]["num_examples"] == 16
  assert os.path.exists(os.path.join(workdir, "report", "eval_unet_r0_s0.png"))
  table = stdout[stdout.index("evaluate unet_r0_s0"):].splitlines()
  assert [line.split()[0] for line in table[2:2 + len(config.data.class_names)]] == list(config.data.class_names)


def _he_variables(model, size: int, seed: int) -> dict:
  """He-normal kernels, unit scales and variances, zero biases and means, drawn in NumPy (no init to compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# float32 rounding is u = 2**-24 ~ 6e-8 per operation. A gradient or batch statistic here comes
# out of ~20 reductions (convolutions and BatchNorm means over <= B*H*W = 2048 terms), each of
# which a different device split reorders; a reordered sum of n terms moves by ~sqrt(n) * u of
# the terms' scale, ~3e-6 here, so ~20 of them stay below 1e-4 of the tensor's scale. The step
# is plain SGD so a parameter's update is -lr * gradient, with no sign(g) amplification of
# near-zero gradients (Adam's first step) to excuse.
REDUCTION_RTOL = 1e-4


def _assert_close_to_reduction_error(a, b, what, base=0.0):
  """|a - b| <= REDUCTION_RTOL of their scale, plus one float32 spacing of `base` (a - base was rounded there)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(a).max(), np.abs(b).max())
  assert scale > 0, what
  spacing = float(np.spacing(np.float32(np.abs(base).max())))
  assert np.abs(a - b).max() <= REDUCTION_RTOL * scale + spacing, (what, np.abs(a - b).max() / scale)


def test_batchnorm_statistics_and_params_match_across_device_counts():
  """Under jit over the mesh BatchNorm sees the global batch: 4 devices give 1 device's step.

  The smallest net that still has BatchNorm everywhere (ResNet of one block per stage at 1/8
  width, U-Net decoder) on 8 images of 16 px, 2 per device.
  """
  config = load_config("demo", **{**TINY_SEGMENTER_RUN, "segmentation.base_width": 8})
  model = segmenter.build(config, "unet")
  variables = _he_variables(model, SIZE, seed=0)
  lr = 0.1
  init = TrainState.create(variables["params"], optax.sgd(lr), jax.random.key(0), ema_decay=0.0,
                           batch_stats=variables["batch_stats"])
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 1, (8, SIZE, SIZE, 3)).astype(np.float32),
           "mask": rng.integers(0, 6, (8, SIZE, SIZE)).astype(np.int32), "is_synthetic": np.zeros(8, bool)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    step = jax.jit(functools.partial(segmentation.train_step, model=model, ignore_index=255,
                                     lr_schedule=optax.constant_schedule(lr)),
                   in_shardings=(rep, sharded), out_shardings=(rep, rep))
    with jax.set_mesh(mesh):
      state, metrics = step(jax.device_put(init, rep), parallel.to_global(batch, mesh))
    results.append((float(metrics["loss"]), parallel.to_host(state.batch_stats), parallel.to_host(state.params)))
  (loss_1, stats_1, params_1), (loss_4, stats_4, params_4) = results
  assert np.isfinite(loss_1) and loss_1 == pytest.approx(loss_4, rel=REDUCTION_RTOL)
  flat = traverse_util.flatten_dict
  for path, value in flat(stats_1).items():
    _assert_close_to_reduction_error(value, flat(stats_4)[path], "batch_stats/" + "/".join(path))
  # Every parameter's update (-lr * gradient), not the parameter: the update is what the batch changed,
  # read back to within the float32 spacing of the parameter it was added to.
  start = flat(variables["params"])
  for path, value in flat(params_1).items():
    _assert_close_to_reduction_error(value - start[path], flat(params_4)[path] - start[path], "/".join(path),
                                     base=start[path])
