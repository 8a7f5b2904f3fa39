"""TFRecord wire format: framing, the sequential reader, the offset index and random access."""

import pickle

import pytest

from satsynth_jax.data import tfrecord
from satsynth_jax.data.tfrecord import RecordError

DATAS = [b"", b"a", b"satsynth" * 100, bytes(range(256))]


def test_frame_unframe_round_trip_and_length_mismatch():
  for data in DATAS:
    assert tfrecord.unframe(tfrecord.frame(data), "r") == data
  with pytest.raises(RecordError, match=r"^r: record spans 30 bytes but its header says 24"):
    tfrecord.unframe(tfrecord.frame(b"satsynth") + b"junkjk", "r")


def test_indexed_file_reads_any_record_and_matches_the_sequential_reader(tmp_path):
  path = tmp_path / "x.tfrecord"
  assert tfrecord.write_indexed(path, iter(DATAS)) == len(DATAS)
  assert list(tfrecord.iter_records(path)) == DATAS
  assert tfrecord.read_index(path).tolist() == [0, 16, 33, 849]  # 16 framing bytes per record
  file = tfrecord.IndexedFile(str(path))
  assert len(file) == 4 and [file.read(i) for i in (3, 0, 2, 1)] == [DATAS[i] for i in (3, 0, 2, 1)]
  clone = pickle.loads(pickle.dumps(file))  # after use: the open handle is not pickled
  file.close()
  assert clone.read(2) == DATAS[2]


def test_stale_index_and_bad_index_size_are_named(tmp_path):
  path = tmp_path / "x.tfrecord"
  tfrecord.write_indexed(path, DATAS)
  tfrecord.index_path(path).write_bytes(tfrecord.index_path(path).read_bytes()[:-3])
  with pytest.raises(RecordError, match=r"x\.tfrecord\.index holds 29 bytes"):
    tfrecord.IndexedFile(path)
  tfrecord.write_indexed(path, DATAS[:2])
  tfrecord.index_path(path).write_bytes(bytes(8))  # one offset where the file holds two records
  with pytest.raises(RecordError, match=r"x\.tfrecord: record 0: record spans 33 bytes"):
    tfrecord.IndexedFile(path).read(0)


def test_writing_to_a_bucket_url_is_refused():
  with pytest.raises(ValueError, match=r"gs://b/x\.tfrecord: records are written to a local or mounted folder"):
    tfrecord.write_indexed("gs://b/x.tfrecord", DATAS)
