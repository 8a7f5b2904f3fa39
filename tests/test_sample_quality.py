"""Metric encoder and sample scores: its own run, FID ~0 for real-as-synthetic, noise far off, label fidelity.

Jobs run from the command line on one CPU device, with the tiny demo of
test_train_segmentation.py, so conftest's compilation cache serves both files.
"""

import functools
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import TINY_SEGMENTER_RUN, prepared_demo
from satsynth_jax import resolved, segmenter
from satsynth_jax.data import records
from satsynth_jax.infra import checkpoint, parallel, workdir as layout
from satsynth_jax.jobs import sample_quality, train_metric_encoder
from test_train_segmentation import NUM_TRAIN, SIZE, assert_loss_finite_and_falling

ENCODER_ID = re.compile(r"metric_encoder@30:[0-9a-f]{12}")
# The paper's encoder (the cpu preset scores with D's first run instead: the last test here).
PAPER_ENCODER = {"sample_quality.encoder": "metric_encoder"}
DEFAULT_SET = "diffusion_x0"  # the set the demo config's generator (x0 prediction) samples


def strict_json(path) -> dict:
  """The file parsed as standard JSON: a NaN or Infinity literal fails the test."""

  def reject(literal):
    raise AssertionError(f"{path} holds the non-standard JSON literal {literal}")

  with open(path, encoding="utf-8") as f:
    return json.loads(f.read(), parse_constant=reject)


def write_pairs(directory, config, images, masks) -> None:
  d = config.data
  pairs = (records.Pair(image=image, mask=mask, id=f"pair_{i:03d}", source="synthetic:test", num_classes=d.num_classes)
           for i, (image, mask) in enumerate(zip(images, masks)))
  records.write_records(directory, pairs, num_classes=d.num_classes, class_names=list(d.class_names),
                        source="synthetic:test", examples_per_shard=3)


def encoder_outputs(config, workdir, images) -> tuple[np.ndarray, np.ndarray, dict]:
  """(predicted classes [N, H, W], top-2 logit margin [N, H, W], {"pooled", "spatial"} float64) of the
  trained encoder on uint8 images, computed here with the model alone (no pipeline, no scoring code)."""
  mesh = parallel.make_mesh()
  model, variables, _ = segmenter.restore(config, workdir, resolved.SegmenterRun.metric_encoder(config), mesh)
  apply = jax.jit(functools.partial(model.apply, train=False, return_features=True))
  logits, features = apply(variables, np.stack(images).astype(np.float32) / np.float32(255.0))
  logits = np.asarray(logits, np.float64)
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return logits.argmax(-1), top2[..., 1] - top2[..., 0], {k: np.asarray(v, np.float64) for k, v in features.items()}


def counted_iou(masks: np.ndarray, preds: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
  """{"iou/<k>": |mask = k and pred = k| / |mask = k or pred = k| over labelled pixels (None if empty), "miou"}."""
  labelled = masks != ignore
  out = {}
  for k in range(num_classes):
    union = np.sum(labelled & ((masks == k) | (preds == k)))
    out[k] = None if union == 0 else np.sum(labelled & (masks == k) & (preds == k)) / union
  defined = [v for v in out.values() if v is not None]
  return {"per_class": out, "miou": sum(defined) / len(defined)}


def gram_frechet(x: np.ndarray, y: np.ndarray) -> float:
  """Fréchet distance of two sample sets through their centred Gram product (few samples, many dims).

  With centred rows A [n, D], B [m, D]: S1 = A^T A / (n - 1), S2 = B^T B / (m - 1), and the nonzero
  eigenvalues of S1 S2 are the squared singular values of A B^T / sqrt((n - 1)(m - 1)), so
  tr sqrt(S1^1/2 S2 S1^1/2) is that matrix's nuclear norm. No D x D matrix, no eigh.
  """
  a, b = x - x.mean(0), y - y.mean(0)
  n, m = len(x), len(y)
  cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
  diff = x.mean(0) - y.mean(0)
  return float(diff @ diff + np.sum(a * a) / (n - 1) + np.sum(b * b) / (m - 1) - 2 * cross)


@pytest.fixture(scope="module")
def encoder(segmenter_cli, tmp_path_factory):
  """The tiny demo prepared and its metric encoder trained with --mode=train_metric_encoder (30 steps)."""
  config, workdir = prepared_demo(tmp_path_factory, "quality", {**TINY_SEGMENTER_RUN, **PAPER_ENCODER})
  segmenter_cli("train_metric_encoder", workdir)
  return config, workdir


def evaluate_samples(segmenter_cli, workdir, synthetic_dir=None) -> tuple[dict, str]:
  """(metrics/sample_quality_<set>.json, stdout) of --mode=evaluate_samples on data.synthetic_dir (default: unset)."""
  stdout = segmenter_cli("evaluate_samples", workdir,
                         {**PAPER_ENCODER, **({"data.synthetic_dir": synthetic_dir} if synthetic_dir else {})})
  name = os.path.basename(synthetic_dir) if synthetic_dir else DEFAULT_SET
  return strict_json(os.path.join(workdir, "metrics", f"sample_quality_{name}.json")), stdout


@pytest.fixture(scope="module")
def real_as_synthetic(segmenter_cli, encoder) -> dict:
  """Scores of <workdir>/synthetic (the default) holding a copy of the real train records."""
  _, workdir = encoder
  shutil.copytree(os.path.join(workdir, "data", "train"), layout.synthetic_dir(workdir, DEFAULT_SET))
  scores, stdout = evaluate_samples(segmenter_cli, workdir)
  assert f"sample_quality_{DEFAULT_SET}: FID {scores['fid']:.4g}" in stdout
  return scores


def test_encoder_trains_in_its_own_run_and_a_rerun_changes_nothing(encoder):
  config, workdir = encoder
  encoder_dir = layout.checkpoint_dir(workdir, "metric_encoder")
  assert checkpoint.manager(encoder_dir, create=False).all_steps() == [15, 30]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["metric_encoder"]  # not the segmenter's unet_r0
  with open(os.path.join(workdir, "metrics", "metric_encoder.jsonl"), encoding="utf-8") as f:
    assert_loss_finite_and_falling([json.loads(line) for line in f])
  mesh = parallel.make_mesh()
  run = resolved.SegmenterRun.metric_encoder(config)
  before = checkpoint.weights_id(run.name, segmenter.restore(config, workdir, run, mesh)[1], 30)
  train_metric_encoder.run(config, workdir)  # already at num_steps: restores, trains nothing
  assert checkpoint.manager(encoder_dir, create=False).all_steps() == [15, 30]
  assert checkpoint.weights_id(run.name, segmenter.restore(config, workdir, run, mesh)[1], 30) == before


def test_real_train_records_as_samples_score_fid_zero_and_the_encoders_own_miou(encoder, real_as_synthetic):
  config, workdir = encoder
  scores = real_as_synthetic
  assert ENCODER_ID.fullmatch(scores["metric_encoder"])
  assert scores["num_real"] == scores["num_synthetic"] == NUM_TRAIN and scores["image_size"] == SIZE
  assert scores["fid"] < 1e-6 and scores["sfid"] < 1e-6
  assert scores["is"] == pytest.approx(scores["real_is"], rel=1e-9)
  assert 1.0 < scores["is"]["mean"] <= config.data.num_classes
  assert scores["is"]["splits"] == 1 and scores["is"]["std"] == 0.0  # 4 images: too few to split
  # The synthetic masks are the real ones: label fidelity is the encoder's IoU on them, counted here
  # pixel by pixel from its own predictions (a pixel within 1e-3 of a tie may flip between this
  # forward pass and the CLI's, and moves an IoU by at most 1 / its union).
  pairs = list(records.PairSource(os.path.join(workdir, "data", "train")))
  preds, margin, _ = encoder_outputs(config, workdir, [p["image"] for p in pairs])
  want = counted_iou(np.stack([p["mask"] for p in pairs]), preds, config.data.num_classes)
  slack = np.sum(margin < 1e-3) + 1e-12
  assert scores["label_fidelity_miou"] == pytest.approx(want["miou"], abs=slack)
  for k, name in enumerate(config.data.class_names):
    expected = want["per_class"][k]
    got = scores["label_fidelity"][f"iou/{name}"]
    assert got == (None if expected is None else pytest.approx(expected, abs=slack)), name
  assert os.path.isfile(os.path.join(workdir, "report", f"sample_quality_{DEFAULT_SET}.png"))
  # The same masks: the same class shares, at distance 0, drawn beside each other.
  assert scores["class_tv"] == 0 and scores["class_frequency"]["real"] == scores["class_frequency"]["synthetic"]
  shares = np.array(records.read_manifest(os.path.join(workdir, "data", "train"))["class_pixels"], float)
  np.testing.assert_allclose(list(scores["class_frequency"]["real"].values()), shares / shares.sum())
  assert scores["presence_accuracy"] is None  # not drawn from presence requests
  assert os.path.isfile(os.path.join(workdir, "report", f"class_frequency_{DEFAULT_SET}.png"))


def test_noise_samples_score_the_expected_distance_and_corrupted_masks_their_counted_fidelity(
    segmenter_cli, encoder, real_as_synthetic, tmp_path):
  config, workdir = encoder
  k = config.data.num_classes
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  real = [pair["image"] for pair in records.PairSource(os.path.join(workdir, "data", "train"))]
  preds, margin, noise_features = encoder_outputs(config, workdir, list(noise))
  _, _, real_features = encoder_outputs(config, workdir, real)
  # Masks = the encoder's own predictions with a quarter of the pixels moved to the next class and
  # a tenth marked no-data (also every near-tie pixel, whose prediction may differ in the CLI).
  masks = preds.copy()
  corrupt = rng.random(masks.shape) < 0.25
  masks[corrupt] = (masks[corrupt] + 1) % k
  masks[(rng.random(masks.shape) < 0.1) | (margin < 1e-3)] = 255
  write_pairs(tmp_path / "noise", config, noise, masks.astype(np.uint8))
  write_pairs(tmp_path / "image_only", config, real, [np.full((SIZE, SIZE), 255, np.uint8)] * len(real))

  noisy, _ = evaluate_samples(segmenter_cli, workdir, str(tmp_path / "noise"))
  assert noisy["metric_encoder"] == real_as_synthetic["metric_encoder"] and noisy["num_synthetic"] == 6
  assert noisy["synthetic_dir"] == str(tmp_path / "noise")
  # FID/sFID against a float64 reference of our own (Gram-matrix form) on features taken here; rel
  # 1e-3 covers the float32 features of two forward passes batched differently.
  assert noisy["fid"] == pytest.approx(gram_frechet(real_features["pooled"], noise_features["pooled"]), rel=1e-3)
  assert noisy["sfid"] == pytest.approx(gram_frechet(real_features["spatial"], noise_features["spatial"]), rel=1e-3)
  assert noisy["fid"] > 1e3 * max(real_as_synthetic["fid"], 1e-9)
  # Label fidelity counted by hand: with every prediction known, each class's IoU is its kept
  # pixels over its kept + moved-in + moved-out pixels (no-data excluded).
  want = counted_iou(masks, preds, k)
  assert noisy["label_fidelity_miou"] == pytest.approx(want["miou"], rel=1e-12)
  for c, name in enumerate(config.data.class_names):
    expected = want["per_class"][c]
    assert noisy["label_fidelity"][f"iou/{name}"] == (None if expected is None else pytest.approx(expected, rel=1e-12))
  labelled = masks != 255
  assert noisy["label_fidelity"]["pixel_accuracy"] == pytest.approx(
      np.sum(labelled & (masks == preds)) / np.sum(labelled), rel=1e-12)
  assert 0.5 < noisy["label_fidelity"]["pixel_accuracy"] < 0.9  # ~0.75: a quarter of the pixels moved

  assert os.path.isfile(os.path.join(workdir, "report", "sample_quality_noise.png"))
  image_only, _ = evaluate_samples(segmenter_cli, workdir, str(tmp_path / "image_only"))
  assert image_only["label_fidelity_miou"] is None and image_only["label_fidelity"] is None
  assert image_only["class_tv"] is None  # no labelled pixel: no class shares to compare
  # The noise set's class shares: its masks' own, against the train split's.
  noise_shares = np.bincount(masks[masks != 255], minlength=k) / np.sum(masks != 255)
  np.testing.assert_allclose(list(noisy["class_frequency"]["synthetic"].values()), noise_shares, rtol=1e-9)
  real_shares = np.array(list(noisy["class_frequency"]["real"].values()))
  assert noisy["class_tv"] == pytest.approx(0.5 * np.abs(noise_shares - real_shares).sum(), rel=1e-9)
  assert image_only["fid"] < 1e-6  # the real train images again: only the masks differ
  # No label fidelity picture for a set without labels.
  assert not os.path.exists(os.path.join(workdir, "report", "sample_quality_image_only.png"))


def test_weights_id_changes_with_any_weight_and_names_are_file_safe():
  weights = {"params": {"w": np.zeros((2, 3), np.float32)}, "batch_stats": {"mean": np.zeros(3, np.float32)}}
  changed = {**weights, "batch_stats": {"mean": np.array([0, 0, 1e-7], np.float32)}}
  encoder = resolved.METRIC_ENCODER
  assert checkpoint.weights_id(encoder, weights, 7) == checkpoint.weights_id(encoder, weights, 7)
  assert checkpoint.weights_id(encoder, weights, 7) != checkpoint.weights_id(encoder, changed, 7)
  assert sample_quality.output_name("") == "sample_quality"
  assert sample_quality.output_name("image_only") == "sample_quality_image_only"
  with pytest.raises(ValueError, match=r"'\.\./x'"):
    sample_quality.output_name("../x")


def test_scoring_without_an_encoder_or_with_one_image_says_what_to_do(encoder, tmp_path):
  config, workdir = encoder
  shutil.copytree(os.path.join(workdir, "data"), tmp_path / "data")
  with pytest.raises(checkpoint.CheckpointNotFoundError, match="run --mode=train_metric_encoder first"):
    sample_quality.run_for(config, str(tmp_path), str(tmp_path / "data" / "train"))
  image = np.zeros((SIZE, SIZE, 3), np.uint8)
  write_pairs(tmp_path / "one", config, [image], [np.zeros((SIZE, SIZE), np.uint8)])
  with pytest.raises(sample_quality.TooFewImagesError, match=f"at least 2 images; {tmp_path / 'one'} holds 1$"):
    sample_quality.run_for(config, workdir, str(tmp_path / "one"))


def test_every_set_is_scored_by_one_feature_program():
  """Each set's evaluate_samples builds its extractor: equal encoders share one jitted program."""
  from conftest import load_config
  config, mesh = load_config("demo"), parallel.make_mesh()
  one = sample_quality.make_extractor(segmenter.build(config, "unet"), mesh)
  assert sample_quality.make_extractor(segmenter.build(config, "unet"), mesh) is one
  assert sample_quality.make_extractor(segmenter.build(config, "fpn"), mesh) is not one


def test_with_the_real_only_encoder_sets_are_scored_by_d_first_run_and_named_by_it(encoder, real_as_synthetic,
                                                                                   tmp_path):
  """sample_quality.encoder=real_only (the cpu preset): the R=0 run of seed `seed` scores the set, its JSON
  names that run, and a score made under the other encoder does not count as done."""
  from conftest import load_config
  config, done = encoder
  workdir = tmp_path / "w"
  shutil.copytree(done, workdir)
  # The metric encoder's weights as the R=0 run of seed 0 (both are U-Nets trained on the real train split).
  shutil.copytree(workdir / "checkpoints" / resolved.METRIC_ENCODER, workdir / "checkpoints" / "unet_r0_s0")
  real_only = load_config("demo", **TINY_SEGMENTER_RUN)
  assert resolved.sample_encoder(real_only).name == "unet_r0_s0"
  synthetic = str(layout.synthetic_dir(workdir, DEFAULT_SET))
  assert sample_quality.is_complete(config, workdir, synthetic, DEFAULT_SET)
  assert not sample_quality.is_complete(real_only, workdir, synthetic, DEFAULT_SET)
  scores = sample_quality.run_for(real_only, str(workdir), synthetic, DEFAULT_SET)
  assert scores["metric_encoder"] == real_as_synthetic["metric_encoder"].replace("metric_encoder@", "unet_r0_s0@")
  for key in ("fid", "sfid", "label_fidelity_miou"):  # the same weights: the same scores
    assert scores[key] == pytest.approx(real_as_synthetic[key], abs=1e-6), key
  assert sample_quality.is_complete(real_only, workdir, synthetic, DEFAULT_SET)
  assert not sample_quality.is_complete(config, workdir, synthetic, DEFAULT_SET)
