"""TFDS metadata beside a record directory's shards, written with plain json (no TensorFlow, no TFDS).

`dataset_info.json` (name, version, one split with its shard lengths and a `filepathTemplate`
naming our `shard-NNNNN.tfrecord` files as they are) and `features.json` (the FeaturesDict in
TFDS's own JSON form) let `tfds.builder_from_directory(<set>)` open a prepared, synthetic or
curated set without renaming anything:

  builder = tfds.builder_from_directory("runs/demo/data/train")
  ds = builder.as_dataset(split="train")  # {"image": uint8 [H, W, 3], "mask": [H, W, 1], ...}

`mask` is an Image feature of one channel, uint8 when num_classes <= 255, else uint16,
exactly the PNG the record stores (no-data 255 / 65535). One set folder holds one split:
"val" for a prepared val split, "train" for everything else (prepared train, synthetic and
curated sets). The JSON follows tensorflow_datasets 4.9 (`FeatureConnector.to_json`,
`dataset_info.proto` in proto3 JSON); tests/test_records_tf.py opens it with TFDS.
"""

from __future__ import annotations

import os
import pathlib

from satsynth_jax.infra import atomic

DATASET_INFO = "dataset_info.json"
FEATURES = "features.json"
FILES = (DATASET_INFO, FEATURES)
NAME = "satsynth_pairs"  # TFDS dataset names are identifiers: [a-zA-Z]\w*
VERSION = "1.0.0"
# TFDS fills {SHARD_INDEX} with max(5, digits of the shard count) digits: records.shard_filename.
FILEPATH_TEMPLATE = "shard-{SHARD_INDEX}.tfrecord"
_TFDS = "tensorflow_datasets.core.features."


def split_name(directory: str | os.PathLike, source: str) -> str:
  """The set's TFDS split: "val" for a prepared val split, else "train" (synthetic sets too)."""
  if pathlib.Path(directory).name == "val" and not source.startswith("synthetic"):
    return "val"
  return "train"


def _tensor(cls: str) -> dict:
  return {"pythonClassName": _TFDS + cls, "tensor": {"shape": {}, "dtype": "int64", "encoding": "none"}}


def _image(channels: int, dtype: str) -> dict:
  return {"pythonClassName": _TFDS + "image_feature.Image",
          "image": {"shape": {"dimensions": ["-1", "-1", str(channels)]}, "dtype": dtype, "encodingFormat": "png"}}


def _text() -> dict:
  return {"pythonClassName": _TFDS + "text_feature.Text", "text": {}}


def features(num_classes: int) -> dict:
  """features.json: the record's keys as a TFDS FeaturesDict (mask uint8 or uint16 by class count)."""
  mask_dtype = "uint8" if num_classes <= 255 else "uint16"  # records.ignore_value's rule
  return {"pythonClassName": _TFDS + "features_dict.FeaturesDict",
          "featuresDict": {"features": {
              "image": _image(3, "uint8"), "mask": _image(1, mask_dtype),
              "height": _tensor("scalar.Scalar"), "width": _tensor("scalar.Scalar"),
              "num_classes": _tensor("scalar.Scalar"), "source": _text(), "id": _text()}}}


def _shard_name(index: int, num_shards: int) -> str:
  """FILEPATH_TEMPLATE as TFDS expands it (naming.ShardedFileTemplate)."""
  return f"shard-{index:0{max(5, len(str(num_shards)))}d}.tfrecord"


def dataset_info(manifest: dict, split: str, num_bytes: int) -> dict:
  """dataset_info.json for a manifest's shards (listed in order) as one split."""
  shards = manifest["shards"]
  for i, shard in enumerate(shards):
    # TFDS derives each shard's name from the template, so the files must follow it.
    if shard["file"] != (expected := _shard_name(i, len(shards))):
      raise ValueError(f"shard {i} is {shard['file']!r}; TFDS metadata needs {expected!r}")
  k = manifest["num_classes"]
  names = ", ".join(manifest["class_names"][:20]) + (" ..." if k > 20 else "")
  description = (f"satsynth_jax image-mask pairs from {manifest.get('source', '?')}: image (RGB PNG), mask "
                 f"(class indices 0..{k - 1}, {255 if k <= 255 else 65535} = no-data); classes: {names}. "
                 "manifest.json beside this file has the class names and pixel counts.")
  return {
      "name": NAME,
      "version": VERSION,
      "description": description,
      "fileFormat": "tfrecord",
      "supervisedKeys": {"tuple": {"items": [{"featureKey": "image"}, {"featureKey": "mask"}]}},
      "splits": [{"name": split, "filepathTemplate": FILEPATH_TEMPLATE, "numBytes": str(num_bytes),
                  "shardLengths": [str(shard["count"]) for shard in shards]}],
  }


def write(directory: str | os.PathLike, manifest: dict) -> None:
  """Writes features.json and dataset_info.json (atomically) for the shards `manifest` lists."""
  directory = pathlib.Path(directory)
  num_bytes = sum((directory / shard["file"]).stat().st_size for shard in manifest["shards"])
  split = split_name(directory, manifest.get("source", ""))
  info = dataset_info(manifest, split, num_bytes)  # checks the shard names before anything is written
  atomic.write_json(directory / FEATURES, features(manifest["num_classes"]))
  atomic.write_json(directory / DATASET_INFO, info)
