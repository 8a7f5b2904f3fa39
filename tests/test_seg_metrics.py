"""Confusion matrix and mIoU / F1 against matrices counted by hand."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from satsynth_jax.metrics import segmentation as seg

IGNORE = 255
NAMES = ("background", "building", "road")

# Two 2x3 label maps and predictions; 255 marks no-data pixels.
LABELS = np.array([[[0, 0, 1], [1, 2, IGNORE]],
                   [[0, 0, 0], [2, 2, IGNORE]]])
PREDS = np.array([[[0, 1, 1], [1, 2, 0]],
                  [[0, 0, 2], [2, 1, 1]]])
# Counted by hand (rows: true, columns: predicted); the two ignored pixels are not counted.
# image 0: (0,0) (0,1) (1,1) (1,1) (2,2);  image 1: (0,0) (0,0) (0,2) (2,2) (2,1)
EXPECTED = np.array([[3, 1, 1],
                     [0, 2, 0],
                     [0, 1, 2]])


def test_confusion_matrix_counts_pixels_and_skips_ignore():
  confusion = seg.confusion_matrix(LABELS, PREDS, num_classes=3, ignore_index=IGNORE)
  assert confusion.dtype == np.int32
  np.testing.assert_array_equal(confusion, EXPECTED)


def test_scores_of_the_hand_counted_example():
  scores = seg.segmentation_scores(EXPECTED, NAMES, background_index=0)
  # background: TP 3, FP 0, FN 2; building: TP 2, FP 2, FN 0; road: TP 2, FP 1, FN 1.
  expected = {
      "iou/background": 3 / 5, "iou/building": 2 / 4, "iou/road": 2 / 4,
      "f1/background": 6 / 8, "f1/building": 4 / 6, "f1/road": 4 / 6,
      "miou": (3 / 5 + 2 / 4 + 2 / 4) / 3, "mf1": (6 / 8 + 4 / 6 + 4 / 6) / 3,
      "miou_no_background": 2 / 4, "mf1_no_background": 4 / 6,
      "pixel_accuracy": 7 / 10,
  }
  assert scores.keys() == expected.keys()
  for key, value in expected.items():
    assert scores[key] == pytest.approx(value), key


def test_without_background_index_there_are_no_foreground_means():
  scores = seg.segmentation_scores(EXPECTED, NAMES)
  assert "miou_no_background" not in scores and "mf1_no_background" not in scores


def test_a_class_absent_everywhere_is_nan_and_left_out_of_the_means():
  # Class 3 appears in neither labels nor predictions; class 2 only as a (wrong) prediction.
  labels = np.array([[0, 0, 1, 1]])
  preds = np.array([[0, 2, 1, 1]])
  confusion = seg.confusion_matrix(labels, preds, num_classes=4, ignore_index=IGNORE)
  np.testing.assert_array_equal(confusion, [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  scores = seg.segmentation_scores(confusion, ("bg", "a", "b", "c"), background_index=0)
  assert math.isnan(scores["iou/c"]) and math.isnan(scores["f1/c"])
  assert scores["iou/b"] == 0.0  # predicted but never true: defined, and counts as a miss
  assert scores["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
  assert scores["mf1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  assert scores["miou_no_background"] == pytest.approx((1 + 0) / 2)


def test_an_empty_matrix_scores_nan_without_warnings():
  with np.errstate(all="raise"):
    scores = seg.segmentation_scores(np.zeros((3, 3), np.int64), NAMES, background_index=0)
  assert all(math.isnan(v) for v in scores.values())


def test_labels_outside_the_classes_are_not_counted():
  labels = np.array([0, 1, 7, IGNORE, -1])
  preds = np.array([0, 1, 1, 1, 1])
  confusion = seg.confusion_matrix(labels, preds, num_classes=3, ignore_index=IGNORE)
  np.testing.assert_array_equal(confusion, np.diag([1, 1, 0]))


def test_accumulating_batches_equals_one_shot():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(6, 16, 16))
  labels[rng.random(labels.shape) < 0.1] = IGNORE
  preds = rng.integers(0, 4, size=(6, 16, 16))
  total = None
  for start in range(0, 6, 2):
    batch = seg.confusion_matrix(labels[start:start + 2], preds[start:start + 2], num_classes=4,
                                 ignore_index=IGNORE)
    total = seg.accumulate(total, batch)
  assert total.dtype == np.int64
  one_shot = seg.confusion_matrix(labels, preds, num_classes=4, ignore_index=IGNORE)
  np.testing.assert_array_equal(total, one_shot)
  reference = np.zeros((4, 4), np.int64)
  keep = labels != IGNORE
  np.add.at(reference, (labels[keep], preds[keep]), 1)
  np.testing.assert_array_equal(total, reference)


def test_confusion_matrix_inside_jit_on_a_sharded_batch():
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  labels = jax.device_put(np.tile(LABELS, (2, 1, 1)), sharding)
  preds = jax.device_put(np.tile(PREDS, (2, 1, 1)), sharding)
  step = jax.jit(lambda l, p: seg.confusion_matrix(l, p, num_classes=3, ignore_index=IGNORE))
  np.testing.assert_array_equal(step(labels, preds), 2 * EXPECTED)


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match=r"shape \(3, 3\), expected \(2, 2\)"):
    seg.segmentation_scores(EXPECTED, NAMES[:2])
  with pytest.raises(ValueError, match="background_index=3"):
    seg.segmentation_scores(EXPECTED, NAMES, background_index=3)


def test_int32_counts_of_a_large_split_score_without_overflow():
  # ~1e9 pixels per class (e.g. background over LoveDA's val split) in the int32 matrix that
  # confusion_matrix returns: 2 x TP, the F1 numerator, no longer fits in int32.
  big = 2**30
  confusion = np.array([[big + 6, big], [0, 7]], np.int32)
  scores = seg.segmentation_scores(confusion, ("background", "building"))
  tp, fn = big + 6.0, float(big)
  assert scores["f1/background"] == pytest.approx(2 * tp / (2 * tp + fn), rel=1e-12)  # ~2/3, not ~2
  assert scores["iou/background"] == pytest.approx(tp / (tp + fn), rel=1e-12)
  assert scores["f1/building"] == pytest.approx(14 / (14 + big), rel=1e-12)
  assert scores["pixel_accuracy"] == pytest.approx((tp + 7) / (tp + fn + 7), rel=1e-12)
