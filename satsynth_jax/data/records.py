"""Record directories of image-mask pairs: the pair codec, shards, manifests, PairSource.

A record directory holds `manifest.json` and shards `shard-00000.tfrecord`, ... of
`tf.train.Example` protos in standard TFRecord framing (TensorFlow and TFDS read them),
each with its sidecar offset index `shard-00000.tfrecord.index` (wire format: tfrecord.py),
and TFDS metadata (`dataset_info.json`, `features.json`: tfds_metadata.py).

Masks are stored by class count: uint8 PNG ("L", ignore 255) when K <= 255, else
uint16 PNG ("I;16", ignore 65535). Images are RGB uint8 PNG.

Where records live: readers (read_manifest, PairSource, shard_entry) take a local path or
a bucket URL such as gs://bucket/records/train (see tfrecord.py); writers need a local or
mounted folder.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from satsynth_jax.data import tfds_metadata, tfrecord
from satsynth_jax.infra import atomic
# Re-exported: callers name them records.as_path / records.RecordError.
from satsynth_jax.data.tfrecord import RecordError, as_path  # noqa: F401

FORMAT = "satsynth_jax.pairs/v1"
MANIFEST = "manifest.json"
_SHARD_GLOB = "shard-*.tfrecord"


@dataclasses.dataclass(frozen=True)
class Pair:
  image: np.ndarray  # uint8 [H, W, 3]
  mask: np.ndarray  # integer [H, W] class indices; ignore_value(num_classes) = no-data
  id: str  # unique within the split
  source: str  # dataset name or "synthetic:<checkpoint step>"
  num_classes: int


def ignore_value(num_classes: int) -> int:
  """The stored mask's no-data value: 255 for uint8 masks (K <= 255), else 65535."""
  return 255 if num_classes <= 255 else 65535


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # Level 1: ~4x faster than the default, ~6% larger on a LoveDA patch; prepare is encode-bound.
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def serialize_pair(pair: Pair) -> bytes:
  """A tf.train.Example: image/mask PNG bytes, height, width, num_classes, source, id."""
  image, mask, k = np.asarray(pair.image), np.asarray(pair.mask), pair.num_classes
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"pair {pair.id!r}: image must be uint8 [H, W, 3], got {image.dtype} "
                     f"{image.shape} (mask {mask.shape})")
  if mask.ndim != 2 or mask.shape != image.shape[:2] or mask.dtype.kind not in "ui":
    raise ValueError(f"pair {pair.id!r}: mask must be integer [H, W] matching image "
                     f"{image.shape}, got {mask.dtype} {mask.shape}")
  if not 2 <= k <= 65535:
    raise ValueError(f"pair {pair.id!r}: num_classes must be in [2, 65535], got {k}")
  ignore = ignore_value(k)
  bad = (mask < 0) | ((mask >= k) & (mask != ignore))
  if bad.any():
    raise ValueError(f"pair {pair.id!r}: mask values {np.unique(mask[bad])[:8].tolist()} are "
                     f"neither classes 0..{k - 1} nor ignore {ignore}")
  example = tfrecord.Example()
  feature = example.features.feature
  feature["image"].bytes_list.value.append(_png(image))
  feature["mask"].bytes_list.value.append(_png(mask.astype(np.uint8 if k <= 255 else np.uint16)))
  feature["height"].int64_list.value.append(image.shape[0])
  feature["width"].int64_list.value.append(image.shape[1])
  feature["num_classes"].int64_list.value.append(k)
  feature["source"].bytes_list.value.append(pair.source.encode())
  feature["id"].bytes_list.value.append(pair.id.encode())
  return example.SerializeToString(deterministic=True)


def parse_pair(data: bytes) -> dict:
  """{"image": uint8[H,W,3], "mask": uint8|uint16[H,W], "id", "source", "num_classes"}."""
  example = tfrecord.Example()
  try:
    example.ParseFromString(data)
  except Exception as e:  # protobuf raises its DecodeError (or RuntimeError on upb).
    raise RecordError(f"not a tf.train.Example: {e}") from e
  feature = example.features.feature

  def value(key: str, kind: str):
    if key not in feature or feature[key].WhichOneof("kind") != kind:
      raise RecordError(f"feature {key!r} missing or not a {kind}")
    values = getattr(feature[key], kind).value
    if len(values) != 1:
      raise RecordError(f"feature {key!r} holds {len(values)} values, expected 1")
    return values[0]

  try:
    image = Image.open(io.BytesIO(value("image", "bytes_list")))
    mask = Image.open(io.BytesIO(value("mask", "bytes_list")))
    if image.mode != "RGB" or mask.mode not in ("L", "I;16"):
      raise RecordError(f"PNG modes image={image.mode} mask={mask.mode}; expected RGB, L or I;16")
    image, mask = np.asarray(image), np.asarray(mask)
  except OSError as e:  # Pillow's errors for undecodable or truncated PNGs.
    raise RecordError(f"undecodable PNG: {e}") from e
  pair = {"image": image, "mask": mask, "id": value("id", "bytes_list").decode(),
          "source": value("source", "bytes_list").decode(),
          "num_classes": int(value("num_classes", "int64_list"))}
  size = (value("height", "int64_list"), value("width", "int64_list"))
  if pair["image"].shape[:2] != size or pair["mask"].shape != size:
    raise RecordError(f"pair {pair['id']!r}: image {pair['image'].shape} and mask "
                      f"{pair['mask'].shape} disagree with height, width {size}")
  return pair


def shard_filename(index: int) -> str:
  return f"shard-{index:05d}.tfrecord"


def _class_pixels(mask: np.ndarray, num_classes: int) -> np.ndarray:
  return np.bincount(mask[mask != ignore_value(num_classes)], minlength=num_classes)


def write_shard(path: str | os.PathLike, pairs: Iterable[Pair]) -> dict:
  """Writes a shard and its index atomically (index renamed first); returns its manifest entry."""
  path = tfrecord.local_for_writing(path)
  class_pixels = None

  def serialized() -> Iterator[bytes]:
    nonlocal class_pixels
    for pair in pairs:
      yield serialize_pair(pair)
      counts = _class_pixels(np.asarray(pair.mask), pair.num_classes)
      if class_pixels is None:
        class_pixels = counts
      elif len(counts) != len(class_pixels):
        raise ValueError(f"pair {pair.id!r}: num_classes {pair.num_classes} differs from the "
                         f"earlier pairs of {path} ({len(class_pixels)})")
      else:
        class_pixels += counts

  count = tfrecord.write_indexed(path, serialized())
  return {"file": path.name, "count": count,
          "class_pixels": [] if class_pixels is None else class_pixels.tolist()}


def shard_record_count(path: str | os.PathLike) -> int:
  """Records in a finished shard, from its index; 0 if the shard is absent (not yet written)."""
  path = as_path(path)
  if not path.is_file():
    return 0
  # The index is renamed into place before its shard, so a present shard has a full index.
  if not (index := tfrecord.index_path(path)).is_file():
    raise RecordError(f"{index} is missing although {path} exists")
  return tfrecord.file_size(index) // 8


def shard_entry(path: str | os.PathLike) -> dict:
  """The manifest entry of a shard already on disk (e.g. a resumed job), recounting its masks."""
  path = as_path(path)
  class_pixels, count = None, 0
  for count, data in enumerate(tfrecord.iter_records(path), start=1):
    try:
      pair = parse_pair(data)
    except RecordError as e:
      raise RecordError(f"{path}: record {count - 1}: {e}") from e
    pixels = _class_pixels(pair["mask"], pair["num_classes"])
    class_pixels = pixels if class_pixels is None else class_pixels + pixels
  if (indexed := shard_record_count(path)) != count:
    raise RecordError(f"{tfrecord.index_path(path)} lists {indexed} records but {path} holds {count}")
  return {"file": path.name, "count": count,
          "class_pixels": [] if class_pixels is None else class_pixels.tolist()}


def write_manifest(directory: str | os.PathLike, shards: list[dict], *, num_classes: int,
                   class_names, source: str, **meta) -> None:
  """Writes manifest.json atomically; meta is free-form JSON (patch size, checkpoint step...)."""
  class_names = list(class_names)
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
  class_pixels = np.zeros(num_classes, np.int64)
  for shard in shards:
    if shard["count"]:
      class_pixels += np.asarray(shard["class_pixels"], np.int64)
  manifest = {"format": FORMAT, "num_examples": sum(s["count"] for s in shards),
              "num_classes": num_classes, "class_names": class_names, "source": source,
              "shards": shards, "class_pixels": class_pixels.tolist()}
  if clash := manifest.keys() & meta.keys():
    raise ValueError(f"meta keys {sorted(clash)} are reserved manifest keys")
  directory = tfrecord.local_for_writing(directory)
  # TFDS metadata first: the manifest stays the mark of a finished set.
  tfds_metadata.write(directory, manifest)
  atomic.write_json(directory / MANIFEST, manifest | meta)


def write_records(directory: str | os.PathLike, pairs: Iterable[Pair], *, num_classes: int,
                  class_names, source: str, examples_per_shard: int, overwrite: bool = False,
                  **meta) -> dict:
  """Streams pairs into shards of examples_per_shard, writes the manifest, returns it (verified)."""
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
  directory = tfrecord.local_for_writing(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # The manifest (then the TFDS metadata) goes first, so a crash mid-way leaves a directory that
  # readers, TFDS included, refuse.
  old_files = [directory / name for name in (MANIFEST, *tfds_metadata.FILES) if (directory / name).exists()]
  old_files += sorted(directory.glob(_SHARD_GLOB)) + sorted(directory.glob(_SHARD_GLOB + ".index"))
  if old_files and not overwrite:
    raise RecordError(f"{directory} already holds {old_files[0].name} (from an earlier or "
                      "interrupted write); pass overwrite=True to replace it")
  for old in old_files:
    old.unlink()

  seen_ids = set()

  def checked(pairs: Iterable[Pair]) -> Iterator[Pair]:
    for pair in pairs:
      if pair.num_classes != num_classes:
        raise ValueError(f"pair {pair.id!r}: num_classes {pair.num_classes} != {num_classes}")
      if pair.id in seen_ids:
        raise ValueError(f"pair id {pair.id!r} appears twice in {directory}")
      seen_ids.add(pair.id)
      yield pair

  stream, shards = checked(pairs), []
  for first in stream:
    chunk = itertools.chain([first], itertools.islice(stream, examples_per_shard - 1))
    shards.append(write_shard(directory / shard_filename(len(shards)), chunk))
  if not shards:  # an empty set is never saved as finished
    raise RecordError(f"{directory}: no examples to write; no manifest was saved")
  write_manifest(directory, shards, num_classes=num_classes, class_names=class_names,
                 source=source, **meta)
  return read_manifest(directory)


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest, after checking it against the shards and indexes on disk."""
  directory = as_path(directory)
  path = directory / MANIFEST
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise RecordError(f"{path} is missing: not a record directory, or its write did not finish")
  except json.JSONDecodeError as e:
    raise RecordError(f"{path} is not valid JSON: {e}") from e
  if manifest.get("format") != FORMAT:
    raise RecordError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  if missing := {"num_examples", "num_classes", "class_names", "shards"} - manifest.keys():
    raise RecordError(f"{path} lacks keys {sorted(missing)}")
  listed = {shard["file"] for shard in manifest["shards"]}
  if unlisted := sorted(str(p) for p in directory.glob(_SHARD_GLOB) if p.name not in listed):
    raise RecordError(f"{', '.join(unlisted)} not listed in {path}")
  for shard in manifest["shards"]:
    shard_path = directory / shard["file"]
    index_path = tfrecord.index_path(shard_path)
    for required in (shard_path, index_path):
      if not required.is_file():
        raise RecordError(f"{required} is listed in {path} but missing")
    if (size := tfrecord.file_size(index_path)) != 8 * shard["count"]:
      raise RecordError(f"{index_path} holds {size} bytes ({size / 8:g} offsets) but {path} "
                        f"lists {shard['count']} records for {shard['file']}")
  if manifest["num_examples"] != sum(shard["count"] for shard in manifest["shards"]):
    raise RecordError(f"{path}: num_examples {manifest['num_examples']} != sum of shard counts")
  return manifest


class PairSource:
  """grain RandomAccessDataSource over a record directory: global index -> parsed pair.

  `directory` is local (read with os.pread) or a URL such as gs://bucket/records/train
  (read through etils.epath), see tfrecord.py. Picklable (grain ships it to worker
  processes): files open lazily and are dropped on pickling, as is the cache. Thread-safe.

  `cache_bytes` > 0 keeps decoded pairs (read-only arrays) until they hold that many bytes: a
  training run reads a small split once per epoch, hundreds of times, and PNG decoding was three
  quarters of the input pipeline's work per example (benchmarks/RESULTS.md).
  """

  def __init__(self, directory: str | os.PathLike, cache_bytes: int = 0):
    self.directory = as_path(directory)
    self.manifest = read_manifest(self.directory)
    self.num_classes = self.manifest["num_classes"]
    self._files = [tfrecord.IndexedFile(self.directory / shard["file"]) for shard in self.manifest["shards"]]
    self._ends = np.cumsum([len(file) for file in self._files], dtype=np.int64)
    self.cache_bytes = cache_bytes
    self._cache: dict[int, dict] = {}
    self._cached_bytes = 0

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_cache": {}, "_cached_bytes": 0}

  def close(self) -> None:
    for file in self._files:
      file.close()

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} pairs in {self.directory}")
    cached = self._cache.get(index)
    if cached is not None:
      return dict(cached)
    shard = int(np.searchsorted(self._ends, index, side="right"))
    local = index - (int(self._ends[shard - 1]) if shard else 0)
    file = self._files[shard]
    data = file.read(local)
    try:
      pair = parse_pair(data)
    except RecordError as e:
      raise RecordError(f"{file.path}: record {local}: {e}") from e
    size = pair["image"].nbytes + pair["mask"].nbytes
    if self._cached_bytes + size <= self.cache_bytes:
      for array in (pair["image"], pair["mask"]):
        array.flags.writeable = False  # shared by every later read
      self._cache[index] = pair
      self._cached_bytes += size  # threads may race here: the budget is approximate, never unsafe
      return dict(pair)
    return pair

  def __repr__(self) -> str:
    return f"PairSource({str(self.directory)!r}, {len(self)} pairs)"
