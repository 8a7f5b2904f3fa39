"""Exact behaviour of the pipeline's per-example transforms (resize, crop, augment, mix).

Written against surviving mutants of tools/mutation/mutation.sh: each test pins a value the broader
tests in test_pipeline.py leave free (crop offsets, resampling filter, augmentation law).
"""

import collections
import itertools
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from satsynth_jax.data import pipeline


def _example(height, width, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
          "mask": rng.integers(0, 6, (height, width), dtype=np.uint8), "id": "p7"}


def test_eval_crop_is_the_central_window_of_a_non_square_pair():
  ex = _example(10, 13)
  out = pipeline._eval_view(ex, size=4, mode="crop")
  top, left = (10 - 4) // 2, (13 - 4) // 2  # 3, 4
  np.testing.assert_array_equal(out["image"], ex["image"][top:top + 4, left:left + 4])
  np.testing.assert_array_equal(out["mask"], ex["mask"][top:top + 4, left:left + 4])
  assert out["id"] == "p7"


def test_train_crop_is_a_random_window_and_keeps_the_id():
  ex = _example(9, 12)
  origins = set()
  for seed in range(30):
    out = pipeline._train_view(ex, np.random.default_rng(seed), size=5, mode="crop", augment=False)
    assert out["id"] == "p7" and out["image"].shape == (5, 5, 3)
    hits = [(t, l) for t in range(5) for l in range(8)
            if np.array_equal(out["image"], ex["image"][t:t + 5, l:l + 5])
            and np.array_equal(out["mask"], ex["mask"][t:t + 5, l:l + 5])]
    assert len(hits) == 1  # an exact window of the pair, not a resize
    origins.add(hits[0])
  assert len(origins) > 5  # random, not the centre every time


def test_crop_refuses_a_pair_smaller_than_the_crop_in_one_dimension_only():
  with pytest.raises(pipeline.PipelineError, match="smaller than"):
    pipeline._eval_view(_example(3, 10), size=4, mode="crop")
  with pytest.raises(pipeline.PipelineError, match="smaller than"):
    pipeline._eval_view(_example(10, 3), size=4, mode="crop")


def test_fit_refuses_non_rgb_images_and_mismatched_masks():
  ex = _example(8, 8)
  with pytest.raises(ValueError, match="expected image"):
    pipeline._eval_view({**ex, "image": np.zeros((8, 8, 4), np.uint8)}, size=4, mode="resize")
  with pytest.raises(ValueError, match="expected image"):
    pipeline._eval_view({**ex, "mask": np.zeros((8, 7), np.uint8)}, size=4, mode="resize")


@pytest.mark.parametrize("shape, size, filter_", [((4, 6), 8, Image.Resampling.BILINEAR),
                                                  ((12, 10), 5, Image.Resampling.BOX)])
def test_resize_enlarges_bilinearly_and_shrinks_by_area(shape, size, filter_):
  ex = _example(*shape)
  out = pipeline._eval_view(ex, size=size, mode="resize")
  want = np.asarray(Image.fromarray(ex["image"]).resize((size, size), filter_))
  np.testing.assert_array_equal(out["image"], want)
  other = Image.Resampling.BOX if filter_ == Image.Resampling.BILINEAR else Image.Resampling.BILINEAR
  assert not np.array_equal(out["image"], np.asarray(Image.fromarray(ex["image"]).resize((size, size), other)))


def test_dihedral_draws_the_eight_transforms_uniformly():
  image = np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(np.uint8)  # asymmetric: all 8 images differ
  mask = image[..., 0]
  counts = collections.Counter()
  rng = np.random.default_rng(0)
  n = 4000
  for _ in range(n):
    out_image, out_mask = pipeline._dihedral(image, mask, rng)
    np.testing.assert_array_equal(out_mask, out_image[..., 0])  # the same transform for both
    counts[out_image.tobytes() + bytes(out_image.shape)] += 1
  assert len(counts) == 8
  # Each 1/8: the standard error of a share is 0.005 at n=4000, so 0.03 is 6 sigma.
  np.testing.assert_allclose(np.array(list(counts.values())) / n, 1 / 8, atol=0.03)


def test_mix_of_finite_sets_is_endless():
  real = grain.MapDataset.source([{"id": f"r{i}"} for i in range(2)])
  synthetic = grain.MapDataset.source([{"id": f"s{i}"} for i in range(3)])
  mixed = pipeline.mix(real, synthetic, 0.5)
  assert len(mixed) == sys.maxsize  # grain's endless length: iteration (the batches) never stops
  ids = [example["id"] for example in itertools.islice(iter(mixed.to_iter_dataset()), 60)]
  assert collections.Counter(ids) == collections.Counter({"r0": 15, "r1": 15, "s0": 10, "s1": 10, "s2": 10})
