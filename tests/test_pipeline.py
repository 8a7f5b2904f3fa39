"""grain pipelines: shapes, paired augmentation, resizing, determinism, sharding, resumption, mixing."""

import itertools

import grain
import numpy as np
import pytest

from conftest import load_config
from satsynth_jax import labels
from satsynth_jax.data import pipeline, records

K = 6  # the demo config's classes
IGNORE = 255
NAMES = [f"class{i}" for i in range(K)]
# Channels 1-2 paint the class (so the mask is a function of the colour), channel 0 holds the
# example's number, which no flip, crop or resize changes.
COLOURS = np.zeros((256, 2), np.uint8)
COLOURS[:K] = [(0, 0), (0, 200), (200, 0), (200, 200), (100, 50), (50, 100)]
COLOURS[IGNORE] = (255, 255)
CLASS_OF_COLOUR = {tuple(c): k for k, c in enumerate(COLOURS) if k < K or k == IGNORE}
NUM_REAL, NUM_SMALL_REAL, NUM_SYNTHETIC = 24, 8, 40
SYNTHETIC_OFFSET = 100  # synthetic examples are numbered from here


def make_pair(number: int, size: int = 32) -> records.Pair:
  """Mask constant on aligned 2x2 blocks, so an exact 2x area shrink keeps image = COLOURS[mask]."""
  rng = np.random.default_rng(number)
  blocks = rng.integers(0, K, (size // 2, size // 2))
  blocks[rng.random(blocks.shape) < 0.1] = IGNORE
  mask = blocks.repeat(2, 0).repeat(2, 1).astype(np.uint8)
  image = np.empty((size, size, 3), np.uint8)
  image[..., 0] = number
  image[..., 1:] = COLOURS[mask]
  return records.Pair(image=image, mask=mask, id=f"p{number:03d}", source="toy", num_classes=K)


def write(directory, numbers) -> str:
  records.write_records(directory, (make_pair(n) for n in numbers), num_classes=K, class_names=NAMES,
                        source="toy", examples_per_shard=10, patch_size=32)
  return str(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("records")
  return {
      "real": write(root / "real", range(NUM_REAL)),
      "small_real": write(root / "small_real", range(NUM_SMALL_REAL)),
      "synthetic": write(root / "synthetic", range(SYNTHETIC_OFFSET, SYNTHETIC_OFFSET + NUM_SYNTHETIC)),
  }


def config(**overrides):
  base = {"data.image_size": 16, "data.patch_size": 32, "data.read_threads": 1}
  return load_config("demo", **(base | overrides))


def take(ds: grain.IterDataset, n: int) -> list[dict]:
  return list(itertools.islice(iter(ds), n))


def numbers_in(batch: dict) -> np.ndarray:
  """The example numbers painted into channel 0 of a segmentation batch."""
  return np.round(batch["image"][..., 0].mean(axis=(1, 2)) * 255).astype(int)


def classes_of_colours(image_uint8: np.ndarray) -> np.ndarray:
  return np.vectorize(lambda a, b: CLASS_OF_COLOUR[(a, b)])(image_uint8[..., 1], image_uint8[..., 2])


def test_diffusion_batches_hold_paired_codes_in_signed_range(dirs):
  cfg = config(**{"data.resize": "resize"})  # 32 -> 16: an exact 2x area shrink
  bits = labels.num_bits(K)
  for batch in take(pipeline.diffusion_batches(cfg, dirs["real"], batch_size=4, seed=0), 3):  # 1 process
    x = batch["x"]
    assert set(batch) == {"x"}
    assert x.shape == (4, 16, 16, 3 + bits) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(np.unique(x[..., 3:])) <= {-1.0, 1.0}
    image, mask = labels.decode_pair(x, K)
    expected = classes_of_colours(image)
    expected[expected == IGNORE] = cfg.data.ignore_fill_class  # no-data is filled for diffusion
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("resize", ["resize", "crop"])
def test_segmentation_batches_keep_image_and_mask_aligned(dirs, resize):
  cfg = config(**{"data.resize": resize})
  batches = take(pipeline.segmentation_batches(cfg, dirs["real"], batch_size=4, seed=0, train=True,
                                               process_index=0, process_count=1), 4)
  for batch in batches:
    assert set(batch) == {"image", "mask", "is_synthetic"}
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == np.int32
    assert batch["is_synthetic"].dtype == bool and not batch["is_synthetic"].any()
    image = np.round(batch["image"] * 255).astype(np.uint8)
    np.testing.assert_array_equal(batch["mask"], classes_of_colours(image))
  assert any((b["mask"] == IGNORE).any() for b in batches)  # no-data is kept for the segmenter


def test_augmentation_draws_all_eight_flips_and_rotations_identically():
  pair = make_pair(7, size=16)
  source = [{"image": pair.image, "mask": pair.mask, "id": pair.id, "source": "toy", "num_classes": K}]
  cfg = config(**{"data.resize": "crop", "data.augment": True})  # 16 -> 16: the crop is the whole pair
  ds = pipeline.pairs(source, cfg, seed=0, train=True, process_index=0, process_count=1)
  variants = [np.rot90(pair.mask, k) for k in range(4)]
  variants += [v[:, ::-1] for v in variants]
  drawn = set()
  for i in range(64):
    out = ds[i]
    matches = [v for v, variant in enumerate(variants) if np.array_equal(out["mask"], variant)]
    assert len(matches) == 1
    drawn.add(matches[0])
    np.testing.assert_array_equal(out["mask"], classes_of_colours(out["image"]))
  assert drawn == set(range(8))


@pytest.mark.parametrize("size", [20, 40])  # non-integer shrink and enlargement
def test_resize_keeps_masks_in_the_class_set(dirs, size):
  cfg = config(**{"data.resize": "resize", "data.image_size": size})
  source = records.PairSource(dirs["small_real"])
  for train in (True, False):
    ds = pipeline.pairs(source, cfg, seed=0, train=train, process_index=0, process_count=1)
    for i in range(NUM_SMALL_REAL):
      out = ds[i]
      assert out["image"].shape == (size, size, 3) and out["mask"].shape == (size, size)
      assert set(np.unique(out["mask"])) <= set(range(K)) | {IGNORE}
  # Without augmentation, nearest sampling keeps every class of a large region.
  source_mask = source[0]["mask"]
  eval_mask = pipeline.pairs(source, cfg, seed=0, train=False, process_index=0, process_count=1)[0]["mask"]
  assert set(np.unique(eval_mask)) <= set(np.unique(source_mask))


def _eval_resize(image, mask, size):
  cfg = config(**{"data.resize": "resize", "data.image_size": size})
  source = [{"image": image, "mask": mask, "id": "x"}]
  out = pipeline.pairs(source, cfg, seed=0, train=False, process_index=0, process_count=1)[0]
  return out["image"], out["mask"]


SCALES = [(48, 32), (100, 64), (20, 32), (30, 64)]  # non-integer shrinks and enlargements


@pytest.mark.parametrize("source_size, size", SCALES)
def test_resized_mask_takes_the_source_pixel_under_each_output_pixel_centre(source_size, size):
  # Every source pixel its own random class, so any offset in the sampling grid shows.
  rng = np.random.default_rng(source_size)
  mask = rng.integers(0, K, (source_size, source_size)).astype(np.uint8)
  image = np.zeros((source_size, source_size, 3), np.uint8)
  _, got = _eval_resize(image, mask, size)
  # Brute force: output pixel i spans [i, i + 1) of the output grid, so its centre lies at
  # (i + 0.5) * source/size in source units; take the source pixel whose centre (j + 0.5) is nearest.
  centres = (np.arange(size) + 0.5) * source_size / size
  nearest = np.abs(centres[:, None] - (np.arange(source_size) + 0.5)[None, :]).argmin(axis=1)
  np.testing.assert_array_equal(got, mask[nearest[:, None], nearest[None, :]])


def _edge_in_output_pixels(profile: np.ndarray) -> float:
  """Where a 0 -> 1 step lies in a resized row: the number of output pixels left of it (area under 1 - profile)."""
  return float(np.sum(1.0 - profile))


@pytest.mark.parametrize("source_size, size", SCALES)
def test_resized_mask_edges_coincide_with_the_resized_image_edges(source_size, size):
  # A two-class pair split at column b: the image (black | white) goes through PIL's BOX or
  # bilinear filter, the mask through nearest sampling. The image's edge is read from its
  # grey levels; the mask's first class-1 column must lie within half an output pixel of it
  # (+0.01 for the image's 8-bit rounding on the few ramp pixels), for every b and both axes.
  # Sampling a quarter or half pixel off the centres misses by 0.75 px or more at some b.
  for b in range(1, source_size):
    mask = np.zeros((source_size, source_size), np.uint8)
    mask[:, b:] = 1
    image = np.repeat((mask * 255)[..., None], 3, axis=2).astype(np.uint8)
    for axis in (1, 0):  # a vertical edge, then (transposed) a horizontal one
      m, im = (mask, image) if axis == 1 else (mask.T.copy(), image.transpose(1, 0, 2).copy())
      resized_image, resized_mask = _eval_resize(im, m, size)
      row = resized_image[size // 2, :, 0] if axis == 1 else resized_image[:, size // 2, 0]
      labels_row = resized_mask[size // 2, :] if axis == 1 else resized_mask[:, size // 2]
      image_edge = _edge_in_output_pixels(row / 255.0)
      mask_edge = int(np.argmax(labels_row)) if labels_row.any() else size
      assert (labels_row[mask_edge:] == 1).all() and (labels_row[:mask_edge] == 0).all()
      assert abs(mask_edge - image_edge) <= 0.51, (b, axis, mask_edge, image_edge)


def test_same_seed_repeats_and_another_seed_differs(dirs):
  def first_batches(seed):
    return take(pipeline.segmentation_batches(config(), dirs["real"], dirs["synthetic"], batch_size=4, seed=seed,
                                              train=True, process_index=0, process_count=1), 3)

  a, b, c = first_batches(0), first_batches(0), first_batches(1)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_training_shards_are_disjoint_and_cover_every_epoch(dirs):
  count, per_process = 3, NUM_REAL // 3
  epochs = {0: [], 1: []}
  for process in range(count):
    batches = take(pipeline.segmentation_batches(config(), dirs["real"], batch_size=4, seed=0, train=True,
                                                 process_index=process, process_count=count), 2 * per_process // 4)
    numbers = np.concatenate([numbers_in(b) for b in batches])
    epochs[0].append(numbers[:per_process])
    epochs[1].append(numbers[per_process:])
  for shares in epochs.values():
    together = np.concatenate(shares)
    assert sorted(together) == list(range(NUM_REAL))  # disjoint (no repeats) and covering
  assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # reshuffled


# 24 over 5 processes: 5 or 4 each, padded to 2 batches of 4; over 30: 1 or 0 each, 1 batch of 2.
@pytest.mark.parametrize("count, batch_size, num_batches", [(5, 4, 2), (30, 2, 1)])
def test_eval_pass_pads_and_sees_each_example_once(dirs, count, batch_size, num_batches):
  seen = []
  for process in range(count):
    ds = pipeline.segmentation_batches(config(), dirs["real"], batch_size=batch_size, seed=0, train=False,
                                       process_index=process, process_count=count)
    batches = list(ds)
    assert len(batches) == num_batches
    for batch in batches:
      assert batch["valid"].dtype == bool
      assert (batch["mask"][~batch["valid"]] == IGNORE).all()
      assert not batch["is_synthetic"].any()
      valid_numbers = numbers_in(batch)[batch["valid"]]
      np.testing.assert_array_equal(valid_numbers, sorted(valid_numbers))  # ordered
      seen.extend(valid_numbers)
    assert list(ds) and all(np.array_equal(x["image"], y["image"]) for x, y in zip(batches, ds))
  assert sorted(seen) == list(range(NUM_REAL))


def test_iterator_state_restores_mid_epoch(dirs):
  ds = pipeline.segmentation_batches(config(**{"data.read_threads": 2}), dirs["real"], dirs["synthetic"],
                                     batch_size=4, seed=3, train=True, process_index=1, process_count=2)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(4))):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def _tagged_numbers(n: int, offset: int = 0) -> grain.MapDataset:
  return grain.MapDataset.range(offset, offset + n).map(lambda i: {"number": i})


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.75])
def test_mix_matches_the_ratio_overall_and_per_batch(fraction):
  draws, batch_size = 4000, 16
  mixed = pipeline.mix(_tagged_numbers(50), _tagged_numbers(250, offset=1000), fraction)
  flags = np.array([mixed[i]["is_synthetic"] for i in range(draws)])
  assert all(mixed[i]["number"] >= 1000 for i in np.flatnonzero(flags)[:100])
  sigma = np.sqrt(draws * fraction * (1 - fraction))
  assert abs(flags.sum() - draws * fraction) < 5 * sigma  # binomial bound at 5 sigma
  per_batch = flags.reshape(-1, batch_size).sum(axis=1)
  assert np.abs(per_batch - batch_size * fraction).max() <= 1.0  # interleaved, not coin flips


def test_mix_extremes_and_bad_fraction():
  real, synthetic = _tagged_numbers(3), _tagged_numbers(5, offset=100)
  assert not any(pipeline.mix(real, synthetic, 0.0)[i]["is_synthetic"] for i in range(20))
  assert all(pipeline.mix(real, synthetic, 1.0)[i]["is_synthetic"] for i in range(20))
  with pytest.raises(ValueError, match="synthetic_fraction must be in"):
    pipeline.mix(real, synthetic, 1.5)


def test_mix_oversamples_the_smaller_real_set(dirs):
  # Real 8, synthetic 40 (5x), half and half: 200 real draws visit each real pair exactly 25 times.
  ds = pipeline.segmentation_batches(config(), dirs["small_real"], dirs["synthetic"], batch_size=8, seed=0,
                                     train=True, synthetic_fraction=0.5, process_index=0, process_count=1)
  batches = take(ds, 50)
  numbers = np.concatenate([numbers_in(b) for b in batches])
  is_synthetic = np.concatenate([b["is_synthetic"] for b in batches])
  np.testing.assert_array_equal(is_synthetic, numbers >= SYNTHETIC_OFFSET)
  real = numbers[~is_synthetic]
  assert len(real) == 200
  np.testing.assert_array_equal(np.bincount(real, minlength=NUM_SMALL_REAL), [25] * NUM_SMALL_REAL)
  for half in np.split(real, 2):
    assert set(half) == set(range(NUM_SMALL_REAL))  # keeps coming back, not used up
  synthetic_counts = np.bincount(numbers[is_synthetic] - SYNTHETIC_OFFSET, minlength=NUM_SYNTHETIC)
  np.testing.assert_array_equal(synthetic_counts, [5] * NUM_SYNTHETIC)


def test_errors_name_the_culprit(dirs):
  with pytest.raises(ValueError, match=r"real: records have num_classes=6, but config.data.num_classes=4"):
    pipeline.diffusion_batches(config(**{"data.num_classes": 4}), dirs["real"], batch_size=2, seed=0,
                               process_index=0, process_count=1)
  big_crop = pipeline.pairs(records.PairSource(dirs["real"]), config(**{"data.resize": "crop", "data.image_size": 48}),
                            seed=0, train=False, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"example 'p000': 32x32 pair is smaller than the 48x48 crop"):
    big_crop[0]
  with pytest.raises(ValueError, match=r"real: records mark no-data pixels with 255, but config.data.ignore_index=6"):
    pipeline.segmentation_batches(config(**{"data.ignore_index": 6}), dirs["real"], batch_size=2, seed=0, train=False,
                                  process_index=0, process_count=1)
  with pytest.raises(ValueError, match="process_index=2 must be in"):
    pipeline.pairs([{}], config(), seed=0, train=True, process_index=2, process_count=2)
