"""Records through etils.epath, the code path bucket URLs (gs://...) take, checked on local files."""

import concurrent.futures
import pickle

import numpy as np
import pytest
from etils import epath

from conftest import load_config
from satsynth_jax.data import pipeline, records, tfrecord

NAMES = [f"class{i}" for i in range(6)]


def make_pairs(n: int, size: int = 16) -> list[records.Pair]:
  rng = np.random.default_rng(0)
  return [records.Pair(image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                       mask=rng.integers(0, 6, (size, size)).astype(np.uint8), id=f"tile_{i:03d}", source="toy",
                       num_classes=6) for i in range(n)]


@pytest.fixture
def split(tmp_path):
  """7 pairs in shards of 3 (counts 3, 3, 1), written to a local folder."""
  records.write_records(tmp_path / "split", make_pairs(7), num_classes=6, class_names=NAMES, source="toy",
                        examples_per_shard=3, patch_size=16)
  return tmp_path / "split"


def test_as_path_keeps_local_paths_local_and_sends_urls_and_epath_objects_to_epath(tmp_path):
  assert type(records.as_path(str(tmp_path))) is type(tmp_path)
  assert isinstance(records.as_path(tmp_path), type(tmp_path))
  for remote in ("gs://bucket/records/train", epath.Path(tmp_path)):
    path = records.as_path(remote)
    assert isinstance(path, epath.Path) and str(path) == str(remote)
  assert str(records.as_path("gs://bucket/records") / "manifest.json") == "gs://bucket/records/manifest.json"


def test_epath_source_reads_the_same_pairs_as_the_local_one(split):
  local, remote = records.PairSource(str(split)), records.PairSource(epath.Path(split))
  assert isinstance(remote.directory, epath.Path) and len(remote) == len(local) == 7
  assert remote.manifest == local.manifest == records.read_manifest(epath.Path(split))
  for i in range(len(local)):
    a, b = local[i], remote[i]
    assert a["id"] == b["id"] == f"tile_{i:03d}"
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])


def test_epath_source_is_thread_safe_and_picklable(split):
  source = records.PairSource(epath.Path(split))
  order = [6, 0, 3, 5, 1, 4, 2] * 4  # every shard, including the last record of each
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    ids = list(pool.map(lambda i: source[i]["id"], order))
  assert ids == [f"tile_{i:03d}" for i in order]
  copy = pickle.loads(pickle.dumps(source))
  assert copy[6]["id"] == "tile_006" and isinstance(copy.directory, epath.Path)
  source.close()
  assert source[0]["id"] == "tile_000"  # reopens lazily after close


def test_epath_source_detects_trailing_bytes_after_the_last_record(split):
  with open(split / records.shard_filename(2), "ab") as f:
    f.write(b"junk")
  with pytest.raises(records.RecordError, match=r"shard-00002.tfrecord: record 0: record spans"):
    records.PairSource(epath.Path(split))[6]


def test_shard_helpers_accept_epath(split):
  shard = epath.Path(split) / records.shard_filename(0)
  assert records.shard_record_count(shard) == 3
  assert records.shard_record_count(epath.Path(split) / records.shard_filename(9)) == 0
  assert records.shard_entry(shard) == records.shard_entry(split / records.shard_filename(0))
  assert len(list(tfrecord.iter_records(shard))) == 3


def test_pipeline_batches_from_an_epath_folder_equal_the_local_ones(split):
  config = load_config("demo", **{"data.image_size": 16, "data.read_threads": 2})
  batches = [list(zip(range(3), pipeline.diffusion_batches(config, d, batch_size=2, seed=1)))
             for d in (str(split), epath.Path(split))]
  for (_, a), (_, b) in zip(*batches):
    np.testing.assert_array_equal(a["x"], b["x"])


def test_writing_to_a_bucket_url_is_refused_with_the_copy_command():
  with pytest.raises(ValueError, match=r"gs://bucket/train: records are written to a local or mounted folder"):
    records.write_records("gs://bucket/train", make_pairs(1), num_classes=6, class_names=NAMES, source="toy",
                          examples_per_shard=1)
