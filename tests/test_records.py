"""TFRecord pair shards: round trips, random access, manifests, atomicity, corruption, pickling."""

import concurrent.futures
import io
import pickle
import shutil

import grain
import numpy as np
import pytest
from PIL import Image

from satsynth_jax.data import records, tfrecord
from satsynth_jax.data.records import Pair, PairSource, RecordError

NAMES6 = [f"class{i}" for i in range(6)]


def make_pairs(n: int, num_classes: int = 6, size: int = 16, seed: int = 0) -> list[Pair]:
  rng = np.random.default_rng(seed)
  ignore = records.ignore_value(num_classes)
  dtype = np.uint8 if num_classes <= 255 else np.uint16
  pairs = []
  for i in range(n):
    mask = rng.integers(0, num_classes, (size, size)).astype(dtype)
    mask[rng.random((size, size)) < 0.1] = ignore
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pairs.append(Pair(image=image, mask=mask, id=f"tile_{i:03d}", source="toy",
                      num_classes=num_classes))
  return pairs


def stored_mask_mode(data: bytes) -> str:
  example = tfrecord.Example()
  example.ParseFromString(data)
  return Image.open(io.BytesIO(example.features.feature["mask"].bytes_list.value[0])).mode


@pytest.fixture
def written(tmp_path):
  """7 pairs in shards of 3 -> counts [3, 3, 1]."""
  pairs = make_pairs(7)
  manifest = records.write_records(tmp_path / "split", pairs, num_classes=6, class_names=NAMES6,
                                   source="toy", examples_per_shard=3, patch_size=16)
  return tmp_path / "split", pairs, manifest


@pytest.mark.parametrize("num_classes, dtype, mode", [(6, np.uint8, "L"), (300, np.uint16, "I;16")])
def test_serialize_parse_round_trip_is_exact(num_classes, dtype, mode):
  pair = make_pairs(1, num_classes=num_classes)[0]
  if num_classes > 255:
    pair.mask[0, :3] = [256, 299, 65535]  # values only uint16 holds, and its ignore value
  data = records.serialize_pair(pair)
  parsed = records.parse_pair(data)
  assert stored_mask_mode(data) == mode
  assert parsed["image"].dtype == np.uint8 and parsed["mask"].dtype == dtype
  np.testing.assert_array_equal(parsed["image"], pair.image)
  np.testing.assert_array_equal(parsed["mask"], pair.mask)
  assert (parsed["id"], parsed["source"], parsed["num_classes"]) == ("tile_000", "toy", num_classes)


def test_serialize_rejects_bad_inputs_naming_pair_and_shapes():
  pair = make_pairs(1)[0]
  bad_image = Pair(pair.image[..., :2], pair.mask, "p7", "toy", 6)
  with pytest.raises(ValueError, match=r"'p7'.*\(16, 16, 2\).*\(16, 16\)"):
    records.serialize_pair(bad_image)
  with pytest.raises(ValueError, match=r"'p7'.*float32"):
    records.serialize_pair(Pair(pair.image.astype(np.float32), pair.mask, "p7", "toy", 6))
  with pytest.raises(ValueError, match=r"'p7'.*\(16, 16, 3\).*\(8, 16\)"):
    records.serialize_pair(Pair(pair.image, pair.mask[:8], "p7", "toy", 6))
  out_of_range = pair.mask.copy()
  out_of_range[0, 0] = 9
  with pytest.raises(ValueError, match=r"'p7'.*\[9\].*0\.\.5.*255"):
    records.serialize_pair(Pair(pair.image, out_of_range, "p7", "toy", 6))


def test_write_records_rolls_over_shards_and_fills_manifest(written):
  directory, pairs, manifest = written
  assert [s["file"] for s in manifest["shards"]] == [records.shard_filename(i) for i in range(3)]
  assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
  assert manifest["num_examples"] == 7 and manifest["num_classes"] == 6
  assert manifest["format"] == records.FORMAT and manifest["source"] == "toy"
  assert manifest["class_names"] == NAMES6 and manifest["patch_size"] == 16

  def pixels(chunk):
    masks = np.concatenate([p.mask.ravel() for p in chunk])
    return np.bincount(masks[masks != 255], minlength=6).tolist()

  assert [s["class_pixels"] for s in manifest["shards"]] == [
      pixels(pairs[0:3]), pixels(pairs[3:6]), pixels(pairs[6:])]
  assert manifest["class_pixels"] == pixels(pairs)
  assert manifest == records.read_manifest(directory)
  # Atomic writes leave no temporaries behind.
  assert sorted(p.name for p in directory.iterdir()) == ["dataset_info.json", "features.json", "manifest.json"] + sorted(
      f"shard-0000{i}.tfrecord{ext}" for i in range(3) for ext in ("", ".index"))


def test_pair_source_random_access_across_shards(written):
  directory, pairs, _ = written
  source = PairSource(directory)
  assert len(source) == 7 and source.num_classes == 6
  for index in np.random.default_rng(1).permutation(7):
    got = source[index]
    assert got["id"] == pairs[index].id
    np.testing.assert_array_equal(got["image"], pairs[index].image)
    np.testing.assert_array_equal(got["mask"], pairs[index].mask)
  with pytest.raises(IndexError):
    source[7]


def test_iter_records_reads_shards_in_order(written):
  directory, pairs, _ = written
  ids = [records.parse_pair(data)["id"]
         for i in range(3) for data in tfrecord.iter_records(directory / records.shard_filename(i))]
  assert ids == [p.id for p in pairs]


def test_framing_matches_a_record_tensorflow_wrote(tmp_path):
  # tf.io.TFRecordWriter's bytes for the payload b"satsynth": length, masked CRC32C of the
  # length, data, masked CRC32C of the data.
  golden = bytes.fromhex("0800000000000000ff86240f73617473796e7468d7104ca4")
  path = tmp_path / "golden.tfrecord"
  path.write_bytes(golden)
  assert list(tfrecord.iter_records(path)) == [b"satsynth"]
  assert tfrecord.frame(b"satsynth") == golden


def test_existing_output_is_refused_unless_overwrite(written):
  directory, _, _ = written
  with pytest.raises(RecordError, match="overwrite=True"):
    records.write_records(directory, make_pairs(2), num_classes=6, class_names=NAMES6,
                          source="toy", examples_per_shard=3)
  manifest = records.write_records(directory, make_pairs(2, seed=5), num_classes=6,
                                   class_names=NAMES6, source="toy", examples_per_shard=3,
                                   overwrite=True)
  # Stale shards from the larger earlier write are gone, so the directory verifies.
  assert [s["count"] for s in manifest["shards"]] == [2]
  assert sorted(p.name for p in directory.iterdir()) == [
      "dataset_info.json", "features.json", "manifest.json", "shard-00000.tfrecord", "shard-00000.tfrecord.index"]
  np.testing.assert_array_equal(PairSource(directory)[1]["image"], make_pairs(2, seed=5)[1].image)


def test_write_records_rejects_duplicate_ids_and_class_mismatch(tmp_path):
  pairs = make_pairs(2)
  with pytest.raises(ValueError, match="'tile_000' appears twice"):
    records.write_records(tmp_path / "a", [pairs[0], pairs[1], pairs[0]], num_classes=6,
                          class_names=NAMES6, source="toy", examples_per_shard=5)
  with pytest.raises(ValueError, match="'tile_000'.*num_classes 6 != 7"):
    records.write_records(tmp_path / "b", pairs, num_classes=7, class_names=NAMES6 + ["x"],
                          source="toy", examples_per_shard=5)
  assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_resume_helpers_recover_shard_entries(written, tmp_path):
  directory, _, manifest = written
  for shard in manifest["shards"]:
    path = directory / shard["file"]
    assert records.shard_record_count(path) == shard["count"]
    assert records.shard_entry(path) == shard
  assert records.shard_record_count(directory / "shard-00042.tfrecord") == 0
  index = directory / "shard-00002.tfrecord.index"
  index.write_bytes(index.read_bytes() * 2)
  with pytest.raises(RecordError, match=r"shard-00002\.tfrecord\.index lists 2 records but .* 1"):
    records.shard_entry(directory / "shard-00002.tfrecord")


def test_an_empty_set_is_refused_and_never_saved_as_finished(tmp_path):
  with pytest.raises(records.RecordError, match="no examples to write; no manifest was saved"):
    records.write_records(tmp_path, [], num_classes=6, class_names=NAMES6, source="toy", examples_per_shard=4)
  assert not (tmp_path / "manifest.json").exists()
  with pytest.raises(records.RecordError, match="manifest.json is missing"):
    records.read_manifest(tmp_path)


def test_flipped_byte_gives_crc_error_naming_file_and_record(written):
  directory, pairs, _ = written
  shard = directory / "shard-00000.tfrecord"
  offsets = np.fromfile(str(shard) + ".index", dtype="<u8")
  data = bytearray(shard.read_bytes())
  data[int(offsets[1]) + 100] ^= 0xFF  # inside record 1's payload
  shard.write_bytes(bytes(data))
  source = PairSource(directory)
  with pytest.raises(RecordError, match=r"shard-00000\.tfrecord: record 1: data CRC mismatch"):
    source[1]
  assert source[2]["id"] == pairs[2].id  # neighbours stay readable
  with pytest.raises(RecordError, match=r"shard-00000\.tfrecord: record 1: data CRC"):
    list(tfrecord.iter_records(shard))


def test_truncated_shard_names_file_and_record(written):
  directory, _, _ = written
  shard = directory / "shard-00001.tfrecord"
  shard.write_bytes(shard.read_bytes()[:-10])
  source = PairSource(directory)
  with pytest.raises(RecordError, match=r"shard-00001\.tfrecord: record 2: truncated"):
    source[5]
  with pytest.raises(RecordError, match=r"shard-00001\.tfrecord: record 2: truncated"):
    list(tfrecord.iter_records(shard))


def test_missing_shard_is_reported(written):
  directory, _, _ = written
  (directory / "shard-00001.tfrecord").unlink()
  with pytest.raises(RecordError, match=r"shard-00001\.tfrecord is listed in .* but missing"):
    PairSource(directory)


def test_missing_index_is_reported(written):
  directory, _, _ = written
  (directory / "shard-00002.tfrecord.index").unlink()
  with pytest.raises(RecordError, match=r"shard-00002\.tfrecord\.index is listed .* but missing"):
    records.read_manifest(directory)


def test_unlisted_shard_is_reported(written):
  directory, _, _ = written
  shutil.copy(directory / "shard-00000.tfrecord", directory / "shard-00009.tfrecord")
  with pytest.raises(RecordError, match=r"shard-00009\.tfrecord not listed in .*manifest.json"):
    PairSource(directory)


def test_index_count_mismatch_is_reported(written):
  directory, _, _ = written
  index = directory / "shard-00000.tfrecord.index"
  index.write_bytes(index.read_bytes()[:-8])
  with pytest.raises(RecordError, match=r"shard-00000\.tfrecord\.index holds 16 bytes .* lists 3"):
    PairSource(directory)


def test_missing_manifest_and_wrong_format_are_reported(written):
  directory, _, _ = written
  text = (directory / "manifest.json").read_text()
  (directory / "manifest.json").write_text(text.replace(records.FORMAT, "other/v9"))
  with pytest.raises(RecordError, match=r"manifest.json: format 'other/v9'"):
    records.read_manifest(directory)
  (directory / "manifest.json").unlink()
  with pytest.raises(RecordError, match=r"manifest.json is missing"):
    PairSource(directory)


def test_pair_source_pickles_after_use(written):
  directory, pairs, _ = written
  source = PairSource(directory)
  source[4]  # opens a file descriptor, which pickling must drop
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == 7 and clone.manifest == source.manifest
  for index in (0, 4, 6):
    np.testing.assert_array_equal(clone[index]["mask"], pairs[index].mask)
  source.close()
  assert clone[3]["id"] == pairs[3].id


def test_pair_source_cache_decodes_each_record_once_within_its_byte_budget(written, monkeypatch):
  directory, pairs, _ = written
  pair_bytes = pairs[0].image.nbytes + pairs[0].mask.nbytes
  decoded = []
  parse = records.parse_pair
  monkeypatch.setattr(records, "parse_pair", lambda data: decoded.append(1) or parse(data))
  source = PairSource(directory, cache_bytes=3 * pair_bytes)  # room for three of the seven pairs
  for _ in range(4):
    for index in range(7):
      got = source[index]
      assert got["id"] == pairs[index].id
      np.testing.assert_array_equal(got["image"], pairs[index].image)
      np.testing.assert_array_equal(got["mask"], pairs[index].mask)
  assert len(decoded) == 3 + 4 * 4  # pairs 0-2 once, the four past the budget on every pass
  cached = source[1]
  with pytest.raises(ValueError, match="read-only"):
    cached["image"][0, 0, 0] = 1  # a reader cannot change what later reads get
  cached["id"] = "changed"
  assert source[1]["id"] == pairs[1].id  # each read gets its own dict
  clone = pickle.loads(pickle.dumps(source))
  assert clone._cache == {} and clone[2]["id"] == pairs[2].id


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_pair_source_is_thread_safe(written, cache_bytes):
  directory, pairs, _ = written
  source = PairSource(directory, cache_bytes=cache_bytes)
  order = np.random.default_rng(2).integers(0, 7, 200)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: source[i], order))
  for index, pair in zip(order, got):
    assert pair["id"] == pairs[index].id
    np.testing.assert_array_equal(pair["image"], pairs[index].image)


def test_pair_source_feeds_a_shuffled_grain_pipeline(written):
  directory, pairs, _ = written
  dataset = grain.MapDataset.source(PairSource(directory)).shuffle(seed=3).map(lambda p: p["id"])
  ids = list(dataset.to_iter_dataset(read_options=grain.ReadOptions(num_threads=2)))
  assert sorted(ids) == [p.id for p in pairs] and ids != [p.id for p in pairs]
