"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Temp files are named `.{name}.{host}-{pid}.XXXXXXXX.tmp` beside the target, so after a
kill -9 their writer is known: `remove_orphans` (run by main.py at start-up, under the job
lock) deletes the ones whose writer is no longer running on this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import socket
import tempfile
from typing import Callable

TEMP_SUFFIX = ".tmp"
# ".{name}.{host}-{pid}.{8 mkstemp characters}.tmp"; names and hosts may hold dots, so a host is
# matched as a known string, never parsed out.
_TEMP_TAIL = re.compile(r"-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


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


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists on this host (one of another user counts as alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def write(path: str | os.PathLike, write_fn: Callable, before_rename: Callable = lambda: None) -> pathlib.Path:
  """write_fn(binary file) to a hidden temp name beside path, fsync, before_rename(), rename, fsync dir."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{socket.gethostname()}-{os.getpid()}.",
                              suffix=TEMP_SUFFIX)
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    with os.fdopen(fd, "wb") as file:
      try:
        write_fn(file)
        file.flush()
        os.fsync(file.fileno())
      except OSError as e:
        if e.filename is None:  # a full disk fails in write/flush, which name no file: name it
          raise OSError(e.errno, e.strerror, str(path)) from e
        raise
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


def temp_writer(name: str, host: str) -> int | None:
  """The pid that wrote temp file `name` (a basename) on `host`; None if `write` did not name it so."""
  match = _TEMP_TAIL.search(name)
  if match is None or not name.startswith(".") or not name[:match.start()].endswith(f".{host}"):
    return None
  return int(match["pid"])


def remove_orphans(root: str | os.PathLike) -> list[pathlib.Path]:
  """Delete the temp files under `root` whose writer ran on this host and is gone; returns them.

  Temp files of other hosts are kept: their writers cannot be checked from here.
  """
  host, removed = socket.gethostname(), []
  for directory, _, files in os.walk(root):
    for name in files:
      pid = temp_writer(name, host) if name.endswith(TEMP_SUFFIX) else None
      if pid is not None and pid != os.getpid() and not pid_alive(pid):
        path = pathlib.Path(directory) / name
        with contextlib.suppress(FileNotFoundError):
          path.unlink()
          removed.append(path)
  return removed
