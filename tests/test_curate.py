"""Curation: the pixel filter on a hand-built pool, fidelity drops, selection (never reading val), the curated set.

Most tests use a scorer whose logits are read off the image (channel 0 encodes the true class),
so which pixels are wrong is known exactly; one runs the real restore path on random weights
saved like test_evaluate.py's, over a tiny prepared demo.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_SEGMENTER_RUN, load_config, prepared_demo
from satsynth_jax import config_check, resolved, segmenter
from satsynth_jax.data import records
from satsynth_jax.infra import checkpoint, identity, workdir as layout
from satsynth_jax.jobs import curate
from satsynth_jax.metrics import curation
from satsynth_jax.train import segmentation
from test_train_segmentation import random_variables

K = 6  # the demo's classes
IGNORE = 255


# ---- the pure maths ----


def _one_hot_logits(labels: np.ndarray, scale: float = 5.0) -> np.ndarray:
  """Logits confident in `labels`: every agreeing pixel has the same small loss, so only errors stand out
  (with noisy logits the rule also trims each class's upper tail: mean + std is not a clean cut)."""
  return scale * np.eye(K, dtype=np.float32)[labels]


def _hand_built_pool():
  """4 pairs of 8x8: masks right everywhere except a 2x2 square of pair 2, labelled 1 where the image shows 0."""
  truth = np.zeros((4, 8, 8), np.int64)
  truth[:, :, 4:] = 1
  truth[1, :4, :4] = 2
  truth[3, 4:, :] = 3
  truth[0, 0, 0] = 4  # a lone pixel of a class seen nowhere else: its std is 0, it must stay
  masks = truth.copy()
  masks[2, 2:4, 2:4] = 1  # the generator claims class 1 where the image shows class 0
  masks[3, 0, :] = IGNORE  # no-data stays no-data and never counts
  region = np.zeros_like(masks, bool)
  region[2, 2:4, 2:4] = True
  return _one_hot_logits(truth), masks, region


def test_pixel_filter_ignores_exactly_the_wrong_region():
  logits, masks, region = _hand_built_pool()
  loss, pred = jax.device_get(curation.pixel_losses(jnp.asarray(logits), jnp.asarray(masks), IGNORE))
  assert np.all(loss[masks == IGNORE] == 0) and np.array_equal(pred, logits.argmax(-1))
  moments = curation.class_loss_moments(loss, masks, K, IGNORE)
  assert moments[0].sum() == (masks != IGNORE).sum()
  thresholds = curation.class_thresholds(moments, tolerance=1.0)
  assert np.isinf(thresholds[5])  # no pool pixel of class 5: nothing to filter
  keep = curation.keep_mask(loss, masks, thresholds, IGNORE)
  np.testing.assert_array_equal(~keep & (masks != IGNORE), region)
  assert not keep[masks == IGNORE].any()
  # Mapped back to 16 px records (the scorer saw 8 px): the square becomes the 4x4 it came from.
  record_mask = np.repeat(np.repeat(masks[2], 2, 0), 2, 1).astype(np.uint8)
  filtered = curation.filtered_mask(record_mask, keep[2], IGNORE)
  expected = record_mask.copy()
  expected[4:8, 4:8] = IGNORE
  np.testing.assert_array_equal(filtered, expected)


def test_thresholds_are_mean_plus_tolerance_std_per_class():
  loss = np.array([[[1.0, 3.0, 10.0, 10.0]]])
  mask = np.array([[[0, 0, 1, IGNORE]]])
  moments = curation.class_loss_moments(loss, mask, 3, IGNORE)
  np.testing.assert_allclose(moments, [[2, 1, 0], [4, 10, 0], [10, 100, 0]])
  thresholds = curation.class_thresholds(moments, tolerance=0.5)
  np.testing.assert_allclose(thresholds[:2], [2.0 + 0.5 * 1.0, 10.0], rtol=1e-5)
  assert np.isinf(thresholds[2])
  # Equal losses never fall above their own mean by rounding.
  same = np.full((1, 7, 7), 0.1, np.float32)
  keep = curation.keep_mask(same, np.zeros((1, 7, 7), int), curation.class_thresholds(
      curation.class_loss_moments(same, np.zeros((1, 7, 7), int), 2, IGNORE), 0.0), IGNORE)
  assert keep.all()


def test_fidelity_is_class_balanced_so_a_dominant_class_cannot_hide_a_wrong_one():
  _, masks, _ = _hand_built_pool()
  pred = masks.copy()
  pred[pred == IGNORE] = 0
  pred[1, :6] = 5  # pair 1: rows 0-5 wrong: class 0 keeps 8 of 16, class 1 8 of 32, class 2 none of 16
  fidelity = curation.label_fidelity(pred, masks, K)
  np.testing.assert_allclose(fidelity, [1.0, (8 / 16 + 8 / 32 + 0 / 16) / 3, 1.0, 1.0])
  assert np.isnan(curation.label_fidelity(pred[:1], np.full((1, 8, 8), IGNORE), K)[0])
  # 60 field pixels right, a 4-pixel building drawn where the scorer sees field: 94% of pixels agree,
  # but the pair holds two classes and one of them is wrong.
  field = np.zeros((1, 8, 8), np.int64)
  mask = field.copy()
  mask[0, :2, :2] = 2
  assert curation.label_fidelity(field, mask, K)[0] == pytest.approx(0.5)


# ---- selection ----


def test_selection_is_exact_deterministic_and_without_replacement():
  candidates = np.arange(3, 40, 2)
  scores = np.linspace(0.0, 1.0, len(candidates))
  for mode in curation.SELECTIONS:
    first = curation.select(candidates, 9, mode, scores, seed=3)
    assert len(first) == len(set(first)) == 9 and set(first) <= set(candidates)
    np.testing.assert_array_equal(first, curation.select(candidates, 9, mode, scores, seed=3))
    assert not np.array_equal(first, curation.select(candidates, 9, mode, scores, seed=4))
  everything = curation.select(candidates, len(candidates), "hard_rare", np.zeros(len(candidates)), seed=0)
  np.testing.assert_array_equal(everything, candidates)  # zero scores still fill the count
  with pytest.raises(ValueError):
    curation.select(candidates, len(candidates) + 1, "uniform", None, seed=0)


def test_hard_rare_favours_pairs_with_the_rare_hard_class():
  """100 pairs, 10 with a rare class that the scorer finds hard: hard_rare picks them far more often."""
  class_pixels = np.array([9000, 900, 100])  # train frequencies: class 2 is rare
  class_loss = np.array([0.1, 0.2, 1.0])  # and hard
  weights = curation.class_weights(class_loss, class_pixels)
  assert weights.argmax() == 2 and np.isclose(weights.sum(), 1.0)
  assert curation.class_weights(class_loss, [10, 0, 10])[1] == 0  # absent from train: no weight
  kept = np.tile([[200, 56, 0]], (100, 1))
  kept[:10] = [200, 26, 30]  # the pairs with the rare class
  scores = curation.pair_scores(kept, weights)
  counts = {mode: np.mean([np.sum(curation.select(np.arange(100), 20, mode, scores, seed) < 10) for seed in range(200)])
            for mode in curation.SELECTIONS}
  assert 1.5 < counts["uniform"] < 2.5  # 20 x 10 / 100 = 2 expected
  assert counts["hard_rare"] > 2 * counts["uniform"]


# ---- the job, with a scorer that reads the class off the image ----


class ImageScorer:
  """Logits peak at the class channel 0 of the image encodes (value 40 c + 20); no weights to train."""

  def apply(self, variables, image, train=False):
    value = image[..., :1] * 255.0
    centres = 40.0 * jnp.arange(K, dtype=jnp.float32) + 20.0
    return -jnp.square((value - centres) / 10.0) * variables["params"]["sharpness"]


def _image_of(truth: np.ndarray) -> np.ndarray:
  image = np.zeros(truth.shape + (3,), np.uint8)
  image[..., 0] = 40 * truth + 20
  image[..., 1] = 90
  return image


def _write(directory, pairs, config, prefix: str) -> dict:
  return records.write_records(
      directory, (records.Pair(image=_image_of(truth), mask=mask.astype(np.uint8), id=f"{prefix}_{i:03d}",
                               source="synthetic:7", num_classes=K) for i, (truth, mask) in enumerate(pairs)),
      num_classes=K, class_names=list(config.data.class_names), source="synthetic:7", examples_per_shard=3)


def _truth(i: int, size: int = 16) -> np.ndarray:
  """Blocks of 4 px, a class per block, varied per pair; class 5 (vehicle) only in pair 0."""
  blocks = (np.arange(16).reshape(4, 4) + i) % 5
  if i == 0:
    blocks[0, 0] = 5
  return np.repeat(np.repeat(blocks, size // 4, 0), size // 4, 1)


@pytest.fixture()
def image_scored(tmp_path, monkeypatch):
  """A workdir with 4 real train pairs and a 10-pair pool (R=2: 8 kept), scored at 8 px by ImageScorer.

  Pool pair 1 is wrong in one 4x4 square, pair 2 is mostly wrong, pair 3 is all no-data; the
  val split does not exist.
  """
  config = load_config("demo", **{"data.image_size": 16, "segmentation.image_size": 8,
                                  "segmentation.eval_batch_size": 4, "sample.per_real": 2,
                                  "sample.examples_per_shard": 3, "curation.selection": "uniform",
                                  "curation.pixel_tolerance": 1.0, "curation.min_fidelity": 0.5})
  workdir = str(tmp_path / "work")
  _write(layout.data_dir(workdir, "train"), [(_truth(i), _truth(i)) for i in range(4)], config, "real")
  pool = []
  for i in range(10):
    truth = _truth(i)
    mask = truth.copy()
    if i == 1:  # class 2 in the image, class 0 in the mask (a loss far above class 0's spread)
      assert np.all(truth[4:8, 8:12] == 2)
      mask[4:8, 8:12] = 0
    if i == 2:  # 3/4 of the pair off by one class: low fidelity, small losses
      mask[:12] = np.where(truth[:12] < 4, truth[:12] + 1, 3)
    if i == 3:
      mask[:] = IGNORE
    pool.append((truth, mask))
  pool_dir = layout.synthetic_dir(workdir, "pool")
  _write(pool_dir, pool, config, "pool")
  identity.record(pool_dir, config, {"generator": "test", "requested": 10})
  variables = {"params": {"sharpness": np.float32(1.0)}}
  monkeypatch.setattr(segmenter, "restore", lambda config, workdir, run, mesh: (ImageScorer(), variables, 7))
  return config, workdir, pool_dir, pool


def _by_id(directory) -> dict:
  source = records.PairSource(directory)
  return {pair["id"]: pair for pair in (source[i] for i in range(len(source)))}


def test_curated_set_filters_the_wrong_square_and_drops_bad_pairs(image_scored, monkeypatch, capsys):
  config, workdir, pool_dir, pool = image_scored
  out_dir = layout.synthetic_dir(workdir, "pool_curated")
  run = resolved.SegmenterRun.metric_encoder(config)
  manifest = curate.curate_set(config, workdir, pool_dir, out_dir, run)
  assert manifest["num_examples"] == 8 and manifest["pool_size"] == 10
  assert manifest["dropped_pairs_fidelity"] == 1 and manifest["dropped_pairs_empty"] == 1
  assert manifest["survivors"] == 8 and manifest["selection"] == "uniform"
  curated = _by_id(out_dir)
  assert sorted(curated) == [f"pool_{i:03d}" for i in (0, 1, 4, 5, 6, 7, 8, 9)]
  for name, pair in curated.items():
    truth, mask = pool[int(name[-3:])]
    np.testing.assert_array_equal(pair["image"], _image_of(truth))
    expected = mask.copy()
    if name == "pool_001":
      expected[4:8, 8:12] = IGNORE  # exactly the wrong square, mapped back from 8 px to 16 px
    np.testing.assert_array_equal(pair["mask"], expected)
  assert manifest["ignored_pixels"] == 16 and manifest["labelled_pixels_before"] == 8 * 256
  assert manifest["scorer"].startswith("metric_encoder@7:")
  recorded = identity.read(out_dir)["shaping"]
  assert recorded["scorer"] == manifest["scorer"] and recorded["pool"] == {"generator": "test", "requested": 10}
  assert os.path.isfile(layout.report_path(workdir, "class_frequency_curation.png"))
  assert "8 of 10 pool pairs kept" in capsys.readouterr().out
  # Recorded but unfinished (the manifest is written before config.json, and rewritten with the counts):
  # the next run curates again, to the same set.
  os.remove(os.path.join(out_dir, records.MANIFEST))
  assert curate.curate_set(config, workdir, pool_dir, out_dir, run) == manifest
  # Stricter settings into another folder: 7 pass, so the most faithful dropped pair that keeps a labelled
  # pixel fills the set (pair 1, wrong in one square, before pair 2, mostly wrong), and the log says so.
  config.curation.min_fidelity = 1.0
  strict = curate.curate_set(config, workdir, pool_dir, layout.synthetic_dir(workdir, "strict"), run)
  assert strict["num_examples"] == 8 and strict["filled_below_min_fidelity"] == 1
  assert strict["dropped_pairs_fidelity"] == 1 and strict["dropped_pairs_empty"] == 1
  assert sorted(_by_id(layout.synthetic_dir(workdir, "strict"))) == sorted(curated)
  assert "filled: 1 of the kept pairs are below min_fidelity" in capsys.readouterr().out
  # A pixel filter that leaves no pixel: nothing can fill the set, and the error says which settings to relax.
  monkeypatch.setattr(curate.curation, "class_thresholds", lambda moments, tolerance: np.full(np.shape(moments[0]), -np.inf))
  with pytest.raises(curate.CurationError, match=r"kept 0 of 10 .*pixel_tolerance.*pool_factor > 2"):
    curate.curate_set(config, workdir, pool_dir, layout.synthetic_dir(workdir, "empty"), run)


def test_thresholds_and_weights_come_from_the_real_train_split_not_the_pool(image_scored):
  """A generator that always draws class 2 as class 1: in the pool, class 1's losses are half small and half
  large, so a threshold from the pool's own spread (mean + std) would keep every wrong pixel and call
  class 1 hard. From the scorer's losses on real train pairs, every wrongly drawn pixel goes."""
  config, workdir, _, _ = image_scored
  config.curation.selection, config.curation.min_fidelity = "hard_rare", 0.0
  pool = []
  for i in range(10):
    truth = _truth(i)
    pool.append((truth, np.where(truth == 2, 1, truth)))
  pool_dir = layout.synthetic_dir(workdir, "always_wrong")
  _write(pool_dir, pool, config, "pool")
  identity.record(pool_dir, config, {"generator": "test", "requested": 10})
  out_dir = layout.synthetic_dir(workdir, "always_wrong_curated")
  manifest = curate.curate_set(config, workdir, pool_dir, out_dir, resolved.SegmenterRun.metric_encoder(config))
  for name, pair in _by_id(out_dir).items():
    truth = _resized(pool[int(name[-3:])][0])
    assert np.all(pair["mask"][truth == 2] == IGNORE), name  # every wrongly drawn pixel filtered
    assert np.all(pair["mask"][truth != 2] == truth[truth != 2]), name  # and nothing else

  def moments_of(pairs):
    total = np.zeros((3, K))
    for truth, mask in pairs:
      small_truth, small_mask = _small(truth), _small(mask)
      logits = ImageScorer().apply({"params": {"sharpness": np.float32(1.0)}},
                                   jnp.asarray(_image_of(small_truth)[None], jnp.float32) / 255.0)
      loss, _ = curation.pixel_losses(logits, jnp.asarray(small_mask[None]), IGNORE)
      total += curation.class_loss_moments(np.asarray(loss), small_mask[None], K, IGNORE)
    return total

  train = records.read_manifest(layout.data_dir(workdir, "train"))
  from_train = curation.class_weights(curation.class_mean_loss(moments_of([(_truth(i), _truth(i)) for i in range(4)])),
                                    train["class_pixels"])
  from_pool = curation.class_weights(curation.class_mean_loss(moments_of(pool)), train["class_pixels"])
  np.testing.assert_allclose(manifest["class_weights"], from_train, rtol=1e-4)
  assert not np.allclose(from_pool, from_train, rtol=1e-2)  # the pool would have made class 1 hard


def _small(labels: np.ndarray) -> np.ndarray:
  """16 px labels at the scorer's 8 px (the pipeline's nearest rule)."""
  return curation.resize_nearest(labels, (8, 8))


def _resized(labels: np.ndarray) -> np.ndarray:
  """The 8 px verdict mapped back to 16 px, as curation writes masks."""
  return curation.resize_nearest(_small(labels), (16, 16))


def test_curating_a_set_into_itself_is_refused_and_deletes_nothing(image_scored):
  """data.synthetic_dir pointed at a curated set (its config.json gone) makes it both pool and output:
  refused before anything is read or written, so no shard is lost."""
  config, workdir, pool_dir, _ = image_scored
  os.remove(os.path.join(pool_dir, "config.json"))
  before = {name: os.path.getmtime(os.path.join(pool_dir, name)) for name in os.listdir(pool_dir)}
  with pytest.raises(curate.CurationError, match=r"is both the pool and the curated set"):
    curate.curate_set(config, workdir, pool_dir, os.path.join(str(pool_dir), "..", os.path.basename(pool_dir)),
                      resolved.SegmenterRun.metric_encoder(config))
  assert {name: os.path.getmtime(os.path.join(pool_dir, name)) for name in os.listdir(pool_dir)} == before


def test_a_pool_smaller_than_r_times_d_is_refused(image_scored):
  config, workdir, pool_dir, _ = image_scored
  config.sample.per_real = 3
  run = resolved.SegmenterRun.metric_encoder(config)
  with pytest.raises(curate.CurationError, match=r"holds 10 pairs .* = 12"):
    curate.curate_set(config, workdir, pool_dir, layout.synthetic_dir(workdir, "c"), run)


# ---- end to end on a tiny prepared demo, through the real restore path ----


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The tiny demo prepared (4 train patches of 16 px), random weights saved as step 5 of the R=0 run,
  and a 12-pair pool written where --mode=sample puts the config's set."""
  config, workdir = prepared_demo(tmp_path_factory, "curate", {
      **TINY_SEGMENTER_RUN, "sample.per_real": 2, "sample.examples_per_shard": 5, "curation.min_fidelity": 0.0,
      "curation.selection": "hard_rare"})
  run = resolved.curation_scorer(config)
  assert run.name == "unet_r0_s0"
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(segmenter, "init_variables", lambda model, size, rng: random_variables(model, 16, 0))
    state = segmentation.init_state(segmenter.build(config, "unet"), 16, config.segmentation.train, jax.random.key(0))
  directory = layout.checkpoint_dir(workdir, run.name)
  identity.record(directory, config, segmenter.shaping(config, run, None, workdir))  # as training records it
  mngr = checkpoint.manager(directory)
  checkpoint.save(mngr, 5, state)
  mngr.wait_until_finished()
  rng = np.random.default_rng(0)
  pool_dir = resolved.synthetic_dir(config, workdir)
  pairs = []
  for i in range(12):
    mask = np.repeat(np.repeat(rng.integers(0, K, (4, 4)), 4, 0), 4, 1).astype(np.uint8)
    if i == 0:
      mask[:2] = IGNORE
    pairs.append(records.Pair(image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), mask=mask,
                              id=f"synthetic_{i:07d}", source="synthetic:3", num_classes=K))
  records.write_records(pool_dir, pairs, num_classes=K, class_names=list(config.data.class_names),
                        source="synthetic:3", examples_per_shard=5)
  identity.record(pool_dir, config, {"generator": "diffusion_x0", "requested": 12})
  return config, workdir, pool_dir


def _forbid_held_out(monkeypatch, workdir):
  """Any read of the val or test split fails the test; the folders are also moved away."""
  held_out = [str(layout.data_dir(workdir, split)) for split in ("val", "test")]
  for folder in held_out:
    shutil.move(folder, folder + "_hidden")

  def guard(fn):
    def guarded(directory, *args, **kwargs):
      assert not any(str(directory).startswith(f) for f in held_out), f"curation read a held-out split: {directory}"
      return fn(directory, *args, **kwargs)
    return guarded

  monkeypatch.setattr(records, "read_manifest", guard(records.read_manifest))
  monkeypatch.setattr(records, "PairSource", guard(records.PairSource))

  def restore():
    for folder in held_out:
      shutil.move(folder + "_hidden", folder)
  return restore


def test_demo_curation_end_to_end_without_reading_val_or_test(demo, monkeypatch):
  config, workdir, pool_dir = demo
  restore = _forbid_held_out(monkeypatch, workdir)
  try:
    manifest = curate.run(config, workdir)
  finally:
    restore()
  out_dir = resolved.curated_dir(config, workdir)
  assert out_dir.name == "diffusion_x0_curated"
  assert manifest == records.read_manifest(out_dir)
  assert manifest["num_examples"] == 2 * 4 and manifest["selection"] == "hard_rare"
  assert manifest["survivors"] == 12 - manifest["dropped_pairs_fidelity"] - manifest["dropped_pairs_empty"]
  assert len(manifest["class_weights"]) == K and np.isclose(sum(manifest["class_weights"]), 1.0)
  # The drop counts are those of the written masks.
  pool, curated = _by_id(pool_dir), _by_id(out_dir)
  labelled = ignored = 0
  for name, pair in curated.items():
    before = pool[name]["mask"]
    np.testing.assert_array_equal(pair["image"], pool[name]["image"])
    assert np.all((pair["mask"] == before) | (pair["mask"] == IGNORE))
    labelled += int((before != IGNORE).sum())
    ignored += int(((before != IGNORE) & (pair["mask"] == IGNORE)).sum())
  assert (manifest["labelled_pixels_before"], manifest["ignored_pixels"]) == (labelled, ignored)
  assert sum(manifest["class_pixels"]) == labelled - ignored
  recorded = identity.read(out_dir)
  assert recorded["shaping"]["scorer"].startswith("unet_r0_s0@5:") and recorded["shaping"]["count"] == 8
  assert curate.is_complete(config, workdir)
  assert os.path.isfile(layout.report_path(workdir, "class_frequency_curation.png"))

  # A rerun is a no-op: nothing is scored or written.
  monkeypatch.setattr(curation, "pool_statistics", lambda *a, **k: pytest.fail("a finished set was scored again"))
  monkeypatch.setattr(records, "write_records", lambda *a, **k: pytest.fail("a finished set was written again"))
  assert curate.run(config, workdir) == manifest
  # Other settings: refused in one line naming the key.
  other = config.copy_and_resolve_references()
  other.curation.pixel_tolerance = 2.0
  with pytest.raises(identity.SettingsMismatchError, match=r"curation.pixel_tolerance: 1.0 -> 2.0"):
    curate.run(other, workdir)
  with pytest.raises(identity.SettingsMismatchError):
    curate.is_complete(other, workdir)


def test_config_check_names_bad_curation_settings():
  config = load_config("demo")
  config_check.validate(config, mode="curate")
  for key, value, message in (("pool_factor", 0, "curation.pool_factor=0"), ("scorer", "val", "curation.scorer='val'"),
                              ("min_fidelity", 1.5, "curation.min_fidelity=1.5"),
                              ("selection", "hard", "curation.selection='hard'")):
    bad = load_config("demo", **{f"curation.{key}": value})
    with pytest.raises(config_check.ConfigError, match=message):
      config_check.validate(bad, mode="curate")
  crop = load_config("demo", **{"data.resize": "crop", "segmentation.image_size": 16})
  with pytest.raises(config_check.ConfigError, match="data.resize='crop'"):
    config_check.validate(crop, mode="curate")


# ---- exact values of the pure maths (mutation testing found these unpinned) ----


def test_pixel_losses_are_the_cross_entropy_of_each_pixel():
  rng = np.random.default_rng(0)
  logits = rng.normal(0.0, 3.0, (2, 3, 5, K)).astype(np.float32)
  mask = rng.integers(0, K, (2, 3, 5))
  mask[0, 0, :2] = IGNORE
  loss, pred = jax.device_get(curation.pixel_losses(jnp.asarray(logits), jnp.asarray(mask), IGNORE))
  z = logits.astype(np.float64)
  log_probs = z - z.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_probs, np.where(mask == IGNORE, 0, mask)[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, np.where(mask == IGNORE, 0.0, want), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pred, logits.argmax(-1))


def test_class_mean_loss_is_nan_only_for_classes_without_pixels():
  moments = np.array([[1.0, 0.0, 4.0], [3.0, 0.0, 2.0], [9.0, 0.0, 1.0]])  # one pixel of class 0
  mean = curation.class_mean_loss(moments)
  np.testing.assert_allclose(mean[[0, 2]], [3.0, 0.5])
  assert np.isnan(mean[1])


def test_keep_mask_uses_each_pixels_own_class_threshold_inclusively():
  thresholds = np.array([1.0, 5.0, np.inf])
  loss = np.array([[[1.0, 1.5, 3.0, 5.0, 5.5, 9.0, 7.0]]], np.float32)
  mask = np.array([[[0, 0, 1, 1, 1, 2, IGNORE]]])
  keep = curation.keep_mask(loss, mask, thresholds, IGNORE)
  np.testing.assert_array_equal(keep[0, 0], [True, False, True, True, False, True, False])


def test_fidelity_of_a_pair_with_one_labelled_pixel():
  mask = np.full((2, 2, 2), IGNORE)
  mask[:, 0, 0] = 3
  pred = np.array([[[3, 0], [0, 0]], [[1, 0], [0, 0]]])
  np.testing.assert_array_equal(curation.label_fidelity(pred, mask, K), [1.0, 0.0])


def test_class_weights_exact_values_and_the_rarity_fallback():
  # Hardness / sqrt(frequency), normalised; a class of one train pixel still counts.
  weights = curation.class_weights([0.02, 0.01, 0.03], [300, 99, 1])
  raw = np.array([0.02 / np.sqrt(0.75), 0.01 / np.sqrt(99 / 400), 0.03 / np.sqrt(1 / 400)])
  np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-12)
  # A class in the train manifest that the scorer never saw (NaN loss) weighs nothing.
  np.testing.assert_allclose(curation.class_weights([0.5, np.nan], [100, 1]), [1.0, 0.0])
  # A perfect scorer (all losses 0): rarity alone, still 0 for a class absent from train.
  fallback = curation.class_weights([0.0, 0.0, 0.0, 0.0], [300, 0, 100, 0])
  raw = np.array([1 / np.sqrt(0.75), 0.0, 1 / np.sqrt(0.25), 0.0])
  np.testing.assert_allclose(fallback, raw / raw.sum(), rtol=1e-12)


def test_pair_scores_are_the_weighted_share_of_each_pairs_own_kept_pixels():
  kept = np.array([[3, 1, 0], [0, 0, 1], [0, 0, 0], [10, 0, 10]])
  weights = np.array([0.1, 0.3, 0.6])
  np.testing.assert_allclose(curation.pair_scores(kept, weights), [0.6 / 4, 0.6, 0.0, 7.0 / 20], rtol=1e-12)


def test_resize_nearest_maps_rows_and_columns_separately():
  array = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(curation.resize_nearest(array, (4, 6)), np.repeat(np.repeat(array, 2, 0), 2, 1))
  np.testing.assert_array_equal(curation.resize_nearest(np.arange(12).reshape(4, 3), (2, 3)),
                                [[3, 4, 5], [9, 10, 11]])


def test_hard_rare_takes_every_positive_score_before_any_zero_score():
  candidates = np.arange(20)
  scores = np.zeros(20)
  scores[[3, 11, 17]] = 1e-3  # tiny but positive: log(u) / score is very negative, still ahead of 0
  for seed in range(20):
    np.testing.assert_array_equal(curation.select(candidates, 3, "hard_rare", scores, seed), [3, 11, 17])
