"""Atomic writes leave either the old file or the whole new one, with normal permissions."""

import os

import pytest

from satsynth_jax import atomic


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
