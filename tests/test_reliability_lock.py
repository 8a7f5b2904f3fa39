"""Workdir locks: one job per kind; held locks name their holder, stale ones are taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from satsynth_jax.infra import lock, workdir as layout


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write(workdir, kind, **info):
  path = layout.lock_path(workdir, kind)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"host": socket.gethostname(), "mode": kind, "started": "then", **info}))
  return path


def test_a_held_lock_is_released_after_the_block_also_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with lock.hold(tmp_path, ["sample"], "sample") as paths:
      info = json.loads(paths[0].read_text())
      assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["mode"] == "sample"
      raise RuntimeError("boom")
  assert not layout.lock_path(tmp_path, "sample").exists()


def test_a_live_holder_is_named(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write(tmp_path, "train_diffusion", pid=holder.pid)
    with pytest.raises(lock.LockHeldError,
                       match=rf"train_diffusion.lock: held by pid {holder.pid} on host {socket.gethostname()}"):
      with lock.hold(tmp_path, ["train_diffusion"], "train_diffusion"):
        pass
  finally:
    holder.kill()
    holder.wait()
  assert json.loads(layout.lock_path(tmp_path, "train_diffusion").read_text())["pid"] == holder.pid  # untouched


def test_several_kinds_are_all_or_nothing(tmp_path):
  _write(tmp_path, "sample", pid=os.getppid())
  with pytest.raises(lock.LockHeldError, match="sample.lock: held by"):
    with lock.hold(tmp_path, ["prepare", "sample", "train_sr"], "experiment"):
      pass
  assert sorted(os.listdir(tmp_path / "locks")) == ["sample.lock"]  # prepare's was given back


@pytest.mark.parametrize("why, info", [
    ("is not running", lambda: {"pid": _dead_pid()}),
    ("ran before this host rebooted", lambda: {"pid": os.getppid(), "boot_id": "another-boot"}),
    ("is now another process", lambda: {"pid": os.getppid(), "proc_start": "1"}),
])
def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog, why, info):
  if "boot" in why and lock.boot_id() is None or "another process" in why and lock.process_start(1) is None:
    pytest.skip("needs Linux /proc")
  _write(tmp_path, "sample", **info())
  with lock.hold(tmp_path, ["sample"], "sample") as paths:
    assert json.loads(paths[0].read_text())["pid"] == os.getpid()
  assert any("taking over the stale lock" in r.getMessage() and why in r.getMessage() for r in caplog.records)
  assert not layout.lock_path(tmp_path, "sample").exists()


def test_a_lock_from_another_host_is_never_taken(tmp_path):
  path = _write(tmp_path, "sample", pid=_dead_pid(), host="elsewhere")
  with pytest.raises(lock.LockHeldError, match="held by pid .* on host elsewhere"):
    with lock.hold(tmp_path, ["sample"], "sample"):
      pass
  assert path.exists()


def test_an_unreadable_lock_is_refused_in_one_line(tmp_path):
  path = layout.lock_path(tmp_path, "sample")
  path.parent.mkdir(parents=True)
  path.write_text("{half")
  with pytest.raises(lock.LockHeldError, match="sample.lock: unreadable lock file"):
    with lock.hold(tmp_path, ["sample"], "sample"):
      pass
