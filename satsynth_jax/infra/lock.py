"""One lock per workdir and job kind, so two jobs never write the same outputs at once.

`<workdir>/locks/<kind>.lock` (workdir.lock_path) is created with O_CREAT | O_EXCL and holds
{"pid", "host", "started", "mode", "boot_id", "proc_start"} of its holder. A second job of
that kind stops with one line naming the holder. A lock left by a killed job is stale when
its host is this one and its pid is gone (or is now another process: the kernel's boot id or
the process start time differ); a stale lock is taken over with a log line. A lock from
another host cannot be checked and is never taken: the message says to delete it if that
job is gone. Locks are released when the job ends, also by an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterable, Iterator

from absl import logging

from satsynth_jax.infra import atomic, workdir as layout
from satsynth_jax.infra.errors import SatSynthError


class LockHeldError(SatSynthError, RuntimeError):
  """Another job of the same kind holds the workdir's lock; the message names it (pid, host)."""


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return None


def boot_id() -> str | None:
  return _read_text("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None off Linux."""
  stat = _read_text(f"/proc/{pid}/stat")
  if stat is None:
    return None
  return stat.rsplit(")", 1)[-1].split()[19]  # fields after "(comm)" start at field 3


def _holder() -> dict:
  pid = os.getpid()
  return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "boot_id": boot_id(), "proc_start": process_start(pid)}


def _stale(info: dict) -> str | None:
  """Why the lock's holder is gone (a phrase), None when it may be alive or lives elsewhere."""
  if info.get("host") != socket.gethostname():
    return None
  pid = int(info["pid"])
  if info.get("boot_id") and boot_id() and info["boot_id"] != boot_id():
    return f"pid {pid} ran before this host rebooted"
  if not _alive(pid):
    return f"pid {pid} is not running"
  if info.get("proc_start") and process_start(pid) not in (None, info["proc_start"]):
    return f"pid {pid} is now another process"
  return None


def _alive(pid: int) -> bool:
  """atomic.pid_alive, where a pid beyond the C range of pids (a garbled lock) names no process."""
  try:
    return atomic.pid_alive(pid)
  except OverflowError:
    return False


def _describe(info: dict) -> str:
  return f"pid {info.get('pid')} on host {info.get('host')}, {info.get('mode')} since {info.get('started')}"


def _take_over(path: pathlib.Path, seen: str) -> None:
  """Remove the stale lock `path` if it still holds `seen`: the rename moves one exact file away, so
  a rival that took the lock over in between is put back rather than lost."""
  aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
  with contextlib.suppress(FileNotFoundError):
    os.rename(path, aside)
    if _read_text(aside) == seen:
      os.unlink(aside)
    else:  # not the stale lock we judged: a live one, put it back (link fails if a third took the path)
      with contextlib.suppress(FileExistsError):
        os.link(aside, path)
      os.unlink(aside)


def _parse(text: str) -> dict | None:
  """A lock file's holder; None unless it names a positive pid (0 and negative pids name process groups)."""
  try:
    info = json.loads(text)
    return info if int(info["pid"]) > 0 else None
  except (ValueError, KeyError, TypeError):
    return None


def _acquire_one(path: pathlib.Path, mode: str) -> dict:
  path.parent.mkdir(parents=True, exist_ok=True)
  mine = {**_holder(), "mode": mode}
  for _ in range(3):  # a stale lock is taken over, then created anew
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      text = _read_text(path)
      if text is None:  # released between the two calls
        continue
      if (info := _parse(text)) is None:
        raise LockHeldError(f"{path}: unreadable lock file ({text[:60]!r}); delete it if no job of this kind "
                            f"is running on this workdir")
      if (why := _stale(info)) is None:
        raise LockHeldError(f"{path}: held by {_describe(info)}; wait for that job to finish, or delete the lock "
                            f"if it is gone") from None
      logging.warning("taking over the stale lock %s of %s: %s", path, _describe(info), why)
      _take_over(path, text)
      continue
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(mine, f)
      f.flush()
      os.fsync(f.fileno())
    return mine
  raise LockHeldError(f"{path}: other jobs keep taking this lock; try again")


def _release(path: pathlib.Path) -> None:
  text = _read_text(path)
  try:
    ours = text is not None and json.loads(text).get("pid") == os.getpid()
  except ValueError:
    ours = False
  if ours:  # never remove a lock another job took over
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


@contextlib.contextmanager
def hold(workdir, kinds: Iterable[str], mode: str) -> Iterator[list[pathlib.Path]]:
  """Hold the locks of `kinds` under `workdir` for the `with` block; LockHeldError if one is taken."""
  taken: list[pathlib.Path] = []
  try:
    for kind in sorted(set(kinds)):
      path = layout.lock_path(workdir, kind)
      _acquire_one(path, mode)
      taken.append(path)
    yield taken
  finally:
    for path in reversed(taken):
      _release(path)
