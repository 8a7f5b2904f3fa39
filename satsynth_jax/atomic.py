"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Callable


def _fsync_dir(directory: pathlib.Path) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write(path: str | os.PathLike, write_fn: Callable, before_rename: Callable = lambda: None) -> pathlib.Path:
  """write_fn(binary file) to a hidden temp name beside path, fsync, before_rename(), rename, fsync dir."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    with os.fdopen(fd, "wb") as file:
      write_fn(file)
      file.flush()
      os.fsync(file.fileno())
    before_rename()
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temp)
    raise
  _fsync_dir(path.parent)
  return path


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  return write(path, lambda file: file.write(data))


def write_json(path: str | os.PathLike, value) -> pathlib.Path:
  return write_bytes(path, json.dumps(value, indent=1).encode())
