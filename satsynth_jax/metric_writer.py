"""Scalars to JSON lines and TensorBoard event files, images to TensorBoard; no TensorFlow.

TensorBoard reads TFRecord files of `Event` protos. We need only three of its fields, so
the protos are encoded by hand (a few lines of wire format) and framed like our records.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time

import numpy as np
from PIL import Image

from satsynth_jax.data import records


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, summary: bytes | None = None, file_version: str | None = None) -> bytes:
  # Event: wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 (Summary).
  out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  # Summary.Value: tag=1, simple_value=2 (float).
  return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def _image_value(tag: str, image: np.ndarray) -> bytes:
  # Summary.Value.image=4: Image{height=1, width=2, colorspace=3, encoded_image_string=4}.
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  h, w = image.shape[:2]
  encoded = (_varint(1 << 3) + _varint(h) + _varint(2 << 3) + _varint(w) + _varint(3 << 3) + _varint(3)
             + _bytes_field(4, buf.getvalue()))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, encoded)


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to <dir>/<name>.jsonl and TB events to <dir>/<name>/.

  Only the writing process (process 0) should construct one; `enabled=False` makes it a no-op
  so call sites stay unconditional.
  """

  def __init__(self, directory: str, name: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    self._jsonl = open(os.path.join(directory, f"{name}.jsonl"), "a", encoding="utf-8")
    events = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._events = open(os.path.join(directory, name, events), "ab")
    self._events.write(records.frame_record(_event(0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    summary = b"".join(_bytes_field(1, _scalar_value(k, v)) for k, v in values.items())
    self._events.write(records.frame_record(_event(int(step), summary)))
    self._events.flush()

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    if not self.enabled:
      return
    self._events.write(records.frame_record(_event(int(step), _bytes_field(1, _image_value(tag, image)))))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()
