"""Scalars to JSON lines and TensorBoard event files; no TensorFlow.

TensorBoard reads TFRecord files of `Event` protos. We need only a few of its fields, so
the protos are encoded by hand (a few lines of wire format) and framed like our records.

Resuming (after a preemption or kill -9): a writer opened with `resume_step=S` rewrites
`<name>.jsonl` without the lines of steps after S, which the resumed run logs again, so
the log reads as one run. TensorBoard events are append-only: a new events file starts
with a SessionLog START event at step S + 1, on which TensorBoard's event loader drops the
earlier run's points from step S + 1 on (its --purge_orphaned_data, on by default). A
loader that ignores SessionLog (e.g. TensorBoard's fast Rust loader may) shows both runs'
points after S.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

from satsynth_jax.data import tfrecord
from satsynth_jax.infra import atomic


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, summary: bytes | None = None, file_version: str | None = None,
           session_start: bool = False) -> bytes:
  # Event: wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 (Summary),
  # session_log=7 (SessionLog: status=1, START=1).
  out = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  if session_start:
    out += _bytes_field(7, _varint(1 << 3) + _varint(1))
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  # Summary.Value: tag=1, simple_value=2 (float).
  return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
  """Atomically rewrite a JSON-lines log keeping only lines with step <= last_step.

  A line cut short by a kill (not valid JSON) is dropped too: appending after it would
  glue the next line onto it.
  """
  try:
    with open(path, encoding="utf-8") as file:
      text = file.read()
  except FileNotFoundError:
    return
  kept = []
  for line in text.splitlines():
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(entry, dict) or int(entry.get("step", 0)) <= last_step:
      kept.append(line)
  if (new := "".join(line + "\n" for line in kept)) != text:
    atomic.write_bytes(path, new.encode())


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to <dir>/<name>.jsonl and TB events to <dir>/<name>/.

  Only the writing process (process 0) should construct one; `enabled=False` makes it a no-op
  so call sites stay unconditional. `resume_step`: the step a resumed run restarts after
  (0 for a fresh start); the log keeps steps <= resume_step only (see the module docstring).
  """

  def __init__(self, directory: str | os.PathLike, name: str, enabled: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    jsonl = os.path.join(directory, f"{name}.jsonl")
    if resume_step is not None:
      truncate_jsonl(jsonl, int(resume_step))
    self._jsonl = open(jsonl, "a", encoding="utf-8")
    events = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._events = open(os.path.join(directory, name, events), "ab")
    self._events.write(tfrecord.frame(_event(0, file_version="brain.Event:2")))
    if resume_step is not None:
      self._events.write(tfrecord.frame(_event(int(resume_step) + 1, session_start=True)))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    summary = b"".join(_bytes_field(1, _scalar_value(k, v)) for k, v in values.items())
    self._events.write(tfrecord.frame(_event(int(step), summary)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()
