"""Our TFRecord shards and TensorFlow's read each other, and TFDS opens a set folder as it is
(skipped where TensorFlow is absent)."""

import dataclasses

import numpy as np
import pytest

from satsynth_jax.data import records, tfrecord

tf = pytest.importorskip(
    "tensorflow", reason="TFRecord interop test needs TensorFlow: pip install -e .[tf]")

from test_records import make_pairs  # noqa: E402  (after the skip: the helper is TF-free)

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "num_classes": tf.io.FixedLenFeature([], tf.int64),
    "source": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
}


@pytest.mark.parametrize("num_classes, mask_dtype", [(6, tf.uint8), (300, tf.uint16)])
def test_tensorflow_reads_our_shards(tmp_path, num_classes, mask_dtype):
  pairs = make_pairs(5, num_classes=num_classes)
  manifest = records.write_records(tmp_path, pairs, num_classes=num_classes,
                                   class_names=[str(i) for i in range(num_classes)],
                                   source="toy", examples_per_shard=2)
  files = [str(tmp_path / shard["file"]) for shard in manifest["shards"]]
  dataset = tf.data.TFRecordDataset(files).map(
      lambda data: tf.io.parse_single_example(data, FEATURES))
  examples = list(dataset.as_numpy_iterator())
  assert len(examples) == 5
  for pair, example in zip(pairs, examples):
    image = tf.io.decode_png(example["image"], channels=3).numpy()
    mask = tf.io.decode_png(example["mask"], dtype=mask_dtype).numpy()[..., 0]
    np.testing.assert_array_equal(image, pair.image)
    np.testing.assert_array_equal(mask, pair.mask)
    assert (example["height"], example["width"]) == pair.mask.shape
    assert example["num_classes"] == num_classes
    assert (example["id"].decode(), example["source"].decode()) == (pair.id, "toy")


def test_we_read_a_record_tensorflow_wrote(tmp_path):
  pair = make_pairs(1, num_classes=300)[0]
  pair.mask[0, :2] = [299, 65535]

  def feature(**kind):
    return tf.train.Feature(**kind)

  example = tf.train.Example(features=tf.train.Features(feature={
      "image": feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(pair.image).numpy()])),
      "mask": feature(bytes_list=tf.train.BytesList(
          value=[tf.io.encode_png(pair.mask[..., None]).numpy()])),
      "height": feature(int64_list=tf.train.Int64List(value=[16])),
      "width": feature(int64_list=tf.train.Int64List(value=[16])),
      "num_classes": feature(int64_list=tf.train.Int64List(value=[300])),
      "source": feature(bytes_list=tf.train.BytesList(value=[b"tf"])),
      "id": feature(bytes_list=tf.train.BytesList(value=[b"from_tf"])),
  }))
  path = tmp_path / "tf.tfrecord"
  with tf.io.TFRecordWriter(str(path)) as writer:
    writer.write(example.SerializeToString())
    writer.write(example.SerializeToString())
  parsed = [records.parse_pair(data) for data in tfrecord.iter_records(path)]
  assert len(parsed) == 2
  np.testing.assert_array_equal(parsed[0]["image"], pair.image)
  np.testing.assert_array_equal(parsed[0]["mask"], pair.mask)
  assert parsed[0]["mask"].dtype == np.uint16
  assert (parsed[0]["id"], parsed[0]["source"], parsed[0]["num_classes"]) == ("from_tf", "tf", 300)


@pytest.fixture
def tfds():
  return pytest.importorskip("tensorflow_datasets", reason="TFDS interop test needs tensorflow-datasets")


@pytest.mark.parametrize("folder, source, num_classes, split", [
    ("val", "toy", 6, "val"),  # a prepared val split, uint8 masks
    ("train", "toy", 300, "train"),  # a prepared train split, uint16 masks (K > 255)
    ("diffusion_x0", "synthetic:800", 6, "train"),  # a synthetic set
])
def test_tfds_builder_from_directory_opens_a_set(tfds, tmp_path, folder, source, num_classes, split):
  directory = tmp_path / folder
  pairs = [dataclasses.replace(p, source=source) for p in make_pairs(5, num_classes=num_classes)]
  manifest = records.write_records(directory, pairs, num_classes=num_classes,
                                   class_names=[str(i) for i in range(num_classes)],
                                   source=source, examples_per_shard=2)
  builder = tfds.builder_from_directory(str(directory))
  assert list(builder.info.splits) == [split]
  assert builder.info.splits[split].shard_lengths == [s["count"] for s in manifest["shards"]]
  assert builder.info.features["mask"].np_dtype == (np.uint8 if num_classes <= 255 else np.uint16)
  examples = {e["id"].decode(): e for e in tfds.as_numpy(builder.as_dataset(split=split))}
  source_pairs = records.PairSource(directory)
  assert sorted(examples) == sorted(source_pairs[i]["id"] for i in range(len(source_pairs))) \
      and len(examples) == 5
  for i in range(len(source_pairs)):
    pair = source_pairs[i]
    example = examples[pair["id"]]
    np.testing.assert_array_equal(example["image"], pair["image"])
    assert example["mask"].shape == pair["mask"].shape + (1,)
    assert example["mask"].dtype == pair["mask"].dtype
    np.testing.assert_array_equal(example["mask"][..., 0], pair["mask"])
    assert (example["height"], example["width"]) == pair["mask"].shape
    assert (example["num_classes"], example["source"].decode()) == (num_classes, source)
  image, mask = next(iter(tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True))))
  assert image.shape == (16, 16, 3) and mask.shape == (16, 16, 1)


def test_an_interrupted_rewrite_leaves_no_tfds_metadata(tfds, tmp_path):
  # Overwriting drops the old metadata with the old shards: TFDS never lists shards that are gone.
  names = list("abcdef")
  records.write_records(tmp_path, make_pairs(5), num_classes=6, class_names=names, source="toy",
                        examples_per_shard=2)
  assert tfds.builder_from_directory(str(tmp_path)).info.splits["train"].num_examples == 5

  def failing():
    yield make_pairs(1)[0]
    raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError, match="interrupted"):
    records.write_records(tmp_path, failing(), num_classes=6, class_names=names, source="toy",
                          examples_per_shard=2, overwrite=True)
  assert not (tmp_path / "dataset_info.json").exists() and not (tmp_path / "features.json").exists()
  records.write_records(tmp_path, make_pairs(3, seed=1), num_classes=6, class_names=names, source="toy",
                        examples_per_shard=5, overwrite=True)
  builder = tfds.builder_from_directory(str(tmp_path))
  assert builder.info.splits["train"].shard_lengths == [3]
  ids = sorted(e["id"].decode() for e in tfds.as_numpy(builder.as_dataset(split="train")))
  assert ids == [p.id for p in make_pairs(3, seed=1)]
