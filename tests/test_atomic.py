"""Atomic writes leave either the old file or the whole new one, with normal permissions; temp files
name their writer, so those of a killed one are found and removed."""

import errno
import os
import socket
import subprocess
import sys

import pytest

from satsynth_jax.infra import atomic


def test_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / "sub" / "plan.json"
  atomic.write_json(path, {"step": 3})
  atomic.write_json(path, {"step": 4})
  assert path.read_text().replace(" ", "").replace("\n", "") == '{"step":4}'
  assert os.listdir(path.parent) == ["plan.json"]
  assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "data.bin"
  atomic.write_bytes(path, b"old")

  def explode(file):
    file.write(b"partial")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    atomic.write(path, explode)
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["data.bin"]


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_temp_files_name_their_writer(tmp_path):
  seen = []

  def spy(file):
    seen.extend(os.listdir(tmp_path))  # the temp file, while it is being written
    file.write(b"x")

  atomic.write(tmp_path / "plan.json", spy)
  host = socket.gethostname()
  assert seen[0].startswith(f".plan.json.{host}-{os.getpid()}.") and seen[0].endswith(".tmp")
  assert atomic.temp_writer(seen[0], host) == os.getpid()
  assert atomic.temp_writer(seen[0], "another-host") is None
  assert atomic.temp_writer(".plan.json.abcdefgh.tmp", host) is None  # an old-style name: owner unknown


def test_a_full_disk_error_names_the_file(tmp_path):
  def full(file):
    raise OSError(errno.ENOSPC, "No space left on device")

  with pytest.raises(OSError) as raised:
    atomic.write(tmp_path / "shard.tfrecord", full)
  assert raised.value.filename == str(tmp_path / "shard.tfrecord")
  assert raised.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path) == []


def test_remove_orphans_deletes_only_temp_files_of_dead_writers_on_this_host(tmp_path):
  host = socket.gethostname()
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  (tmp_path / "sub").mkdir()
  orphan = tmp_path / "sub" / f".a.json.{host}-{proc.pid}.abcd1234.tmp"
  live = tmp_path / f".b.json.{host}-{os.getpid()}.abcd1234.tmp"
  foreign = tmp_path / f".c.json.other-host-{proc.pid}.abcd1234.tmp"
  unrelated = tmp_path / "notes.tmp"
  for path in (orphan, live, foreign, unrelated):
    path.write_bytes(b"x")
  assert atomic.remove_orphans(tmp_path) == [orphan]
  assert not orphan.exists() and live.exists() and foreign.exists() and unrelated.exists()
