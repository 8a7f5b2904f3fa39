"""TFRecord wire format without TensorFlow: framing, CRC32C, tf.train.Example, offset index.

A TFRecord file is a sequence of framed records: length (uint64 LE), masked CRC32C of the
length bytes, the data, masked CRC32C of the data. Beside a file `x.tfrecord` we keep a
sidecar index `x.tfrecord.index` of little-endian uint64 record start offsets, so record i
is one positioned read (a grain RandomAccessDataSource can shuffle globally).

Paths: readers take a local path or a URL such as gs://bucket/dir/x.tfrecord (any
etils.epath filesystem; gs:// needs gcsfs or TensorFlow installed). Local paths read with
os.pread; URLs and epath.Path objects go through epath file handles. Writers need a local
or mounted folder (writes are atomic renames).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import struct
import threading
from typing import Any, Iterable, Iterator

import crc32c
import numpy as np
from etils import epath
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from satsynth_jax.infra import atomic
from satsynth_jax.infra.errors import SatSynthError

_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<QI")  # record length, masked CRC32C of the length bytes
_FOOTER = struct.Struct("<I")  # masked CRC32C of the data
OVERHEAD = _HEADER.size + _FOOTER.size  # framing bytes around each record's data


class RecordError(SatSynthError):
  """A corrupt or truncated record, or a record directory that disagrees with its manifest."""


# ---- paths --------------------------------------------------------------------------------


def as_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
  """Local paths as pathlib.Path; URLs (gs://bucket/dir, s3://...) and epath.Path objects as epath.Path."""
  if isinstance(path, epath.Path) or "://" in os.fspath(path):
    return epath.Path(path)
  return pathlib.Path(path)


def local_for_writing(path: str | os.PathLike) -> pathlib.Path:
  """path as a local pathlib.Path; bucket URLs are refused with the command that copies a folder there."""
  path = as_path(path)
  if not isinstance(path, pathlib.Path):
    raise ValueError(f"{path}: records are written to a local or mounted folder (writes are atomic renames); "
                     f"copy the folder to the bucket afterwards, e.g. gcloud storage cp -r DIR gs://BUCKET/")
  return path


def file_size(path: pathlib.Path | epath.Path) -> int:
  stat = path.stat()
  return stat.st_size if isinstance(path, pathlib.Path) else stat.length


# ---- framing ------------------------------------------------------------------------------


def masked_crc32c(data: bytes) -> int:
  """TFRecord's CRC: CRC32C rotated right by 15 bits plus a constant (CRCs of CRCs stay useful)."""
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
  """Standard TFRecord framing: length, masked CRC32C of it, data, masked CRC32C of the data."""
  length = _LENGTH.pack(len(data))
  return length + _FOOTER.pack(masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


def _length(header: bytes, where: str) -> int:
  """The data length a record header announces, after checking the header's CRC."""
  if len(header) < _HEADER.size:
    raise RecordError(f"{where}: truncated header ({len(header)} of {_HEADER.size} bytes)")
  length, crc = _HEADER.unpack(header)
  if crc != masked_crc32c(header[:_LENGTH.size]):
    raise RecordError(f"{where}: length CRC mismatch (corrupt header)")
  return length


def _data(body: bytes, length: int, where: str) -> bytes:
  """The data of a record's body (data + footer), after checking the data's CRC."""
  if len(body) < length + _FOOTER.size:
    raise RecordError(f"{where}: truncated ({len(body)} of {length + _FOOTER.size} bytes)")
  data = body[:length]
  if _FOOTER.unpack_from(body, length)[0] != masked_crc32c(data):
    raise RecordError(f"{where}: data CRC mismatch (corrupt record)")
  return data


def unframe(record: bytes, where: str) -> bytes:
  """The CRC-checked data of exactly one framed record; `where` names it in errors."""
  length = _length(record[:_HEADER.size], where)
  data = _data(record[_HEADER.size:], length, where)
  if len(record) != length + OVERHEAD:
    raise RecordError(f"{where}: record spans {len(record)} bytes but its header says "
                      f"{length + OVERHEAD} (stale index or trailing bytes)")
  return data


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
  """The CRC-checked records of any TFRecord file in order (no index needed)."""
  with as_path(path).open("rb") as file:
    for index in itertools.count():
      header = file.read(_HEADER.size)
      if not header:
        return
      where = f"{path}: record {index}"
      length = _length(header, where)
      yield _data(file.read(length + _FOOTER.size), length, where)


# ---- tf.train.Example ---------------------------------------------------------------------


def _example_class() -> type:
  """tf.train.Example built in a private descriptor pool.

  Field numbers follow tensorflow/core/example/{example,feature}.proto, so the bytes are
  wire-compatible; the private pool avoids clashing with TensorFlow's own registration.
  """
  f = descriptor_pb2.FieldDescriptorProto
  file = descriptor_pb2.FileDescriptorProto(
      name="satsynth_jax/tf_example.proto", package="tensorflow", syntax="proto3")

  def add(container, name: str, *fields: tuple[str, int, int, str, bool]):
    message = container.add(name=name)
    for field_name, number, field_type, type_name, repeated in fields:
      message.field.add(name=field_name, number=number, type=field_type,
                        type_name=type_name or None,
                        label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL)
    return message

  add(file.message_type, "BytesList", ("value", 1, f.TYPE_BYTES, "", True))
  add(file.message_type, "FloatList", ("value", 1, f.TYPE_FLOAT, "", True))
  add(file.message_type, "Int64List", ("value", 1, f.TYPE_INT64, "", True))
  feature = add(file.message_type, "Feature",
                ("bytes_list", 1, f.TYPE_MESSAGE, ".tensorflow.BytesList", False),
                ("float_list", 2, f.TYPE_MESSAGE, ".tensorflow.FloatList", False),
                ("int64_list", 3, f.TYPE_MESSAGE, ".tensorflow.Int64List", False))
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  features = add(file.message_type, "Features",
                 ("feature", 1, f.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry", True))
  # map<string, Feature> is sugar for a repeated nested entry message flagged map_entry.
  entry = add(features.nested_type, "FeatureEntry", ("key", 1, f.TYPE_STRING, "", False),
              ("value", 2, f.TYPE_MESSAGE, ".tensorflow.Feature", False))
  entry.options.map_entry = True
  add(file.message_type, "Example", ("features", 1, f.TYPE_MESSAGE, ".tensorflow.Features", False))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()


# ---- offset index -------------------------------------------------------------------------


def index_path(path: pathlib.Path | epath.Path) -> pathlib.Path | epath.Path:
  """The sidecar index of a TFRecord file: `<file>.index`."""
  return path.with_name(path.name + ".index")


def write_indexed(path: str | os.PathLike, payloads: Iterable[bytes]) -> int:
  """Frames payloads into `path` and writes its index, both atomically; returns the record count.

  The index is renamed into place before its file, so a present file always has a full index.
  """
  path = local_for_writing(path)
  offsets: list[int] = []

  def write(file) -> None:
    offset = 0
    for data in payloads:
      record = frame(data)
      file.write(record)
      offsets.append(offset)
      offset += len(record)

  atomic.write(path, write, lambda: atomic.write_bytes(index_path(path), np.asarray(offsets, "<u8").tobytes()))
  return len(offsets)


def read_index(path: str | os.PathLike) -> np.ndarray:
  """The record start offsets (uint64) of a TFRecord file, from its sidecar index."""
  index = index_path(as_path(path))
  data = index.read_bytes()
  if len(data) % 8:
    raise RecordError(f"{index} holds {len(data)} bytes, not a whole number of uint64 offsets")
  return np.frombuffer(data, dtype="<u8")


class IndexedFile:
  """Random access to the records of one indexed TFRecord file: record i -> CRC-checked bytes.

  Thread-safe. Picklable (grain ships sources to worker processes): the file opens lazily
  and its handle is dropped on pickling. Local files are read with os.pread, so threads
  share no file offset; epath handles seek + read under a lock.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = as_path(path)
    self.offsets = read_index(self.path)
    self._reset()

  def _reset(self) -> None:
    self._lock = threading.Lock()
    self._handle: Any = None  # local: (fd, size); epath: an open file object

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_handle")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._reset()

  def __len__(self) -> int:
    return len(self.offsets)

  def _bytes(self, start: int, end: int | None) -> bytes:
    """Bytes start..end of the file (end None: to the end of the file)."""
    if isinstance(self.path, pathlib.Path):
      with self._lock:
        if self._handle is None:
          fd = os.open(self.path, os.O_RDONLY)
          self._handle = (fd, os.fstat(fd).st_size)
        fd, size = self._handle
      return os.pread(fd, max((size if end is None else end) - start, 0), start)
    with self._lock:
      if self._handle is None:
        self._handle = self.path.open("rb")
      self._handle.seek(start)
      return self._handle.read() if end is None else self._handle.read(max(end - start, 0))

  def read(self, i: int) -> bytes:
    """The data of record i; errors name the file and the record."""
    start = int(self.offsets[i])
    end = int(self.offsets[i + 1]) if i + 1 < len(self.offsets) else None
    return unframe(self._bytes(start, end), f"{self.path}: record {i}")

  def close(self) -> None:
    with self._lock:
      handle, self._handle = self._handle, None
    if handle is None:
      return
    if isinstance(handle, tuple):
      os.close(handle[0])
    else:
      handle.close()

  def __del__(self):
    # At interpreter exit module globals (os) may already be gone; the OS closes files anyway.
    if getattr(self, "_handle", None) is not None and os is not None and getattr(os, "close", None) is not None:
      self.close()
