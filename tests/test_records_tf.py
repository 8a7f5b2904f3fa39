"""Our TFRecord shards and TensorFlow's read each other (skipped where TensorFlow is absent)."""

import numpy as np
import pytest

from satsynth_jax.data import records

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
  parsed = [records.parse_pair(data) for data in records.iter_records(path)]
  assert len(parsed) == 2
  np.testing.assert_array_equal(parsed[0]["image"], pair.image)
  np.testing.assert_array_equal(parsed[0]["mask"], pair.mask)
  assert parsed[0]["mask"].dtype == np.uint16
  assert (parsed[0]["id"], parsed[0]["source"], parsed[0]["num_classes"]) == ("from_tf", "tf", 300)
