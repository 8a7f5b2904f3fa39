"""Reliability promises, as a user meets them on the command line.

Each defect of the reliability issue is reproduced here: a failure ends with exit code 2 and
exactly one stderr line `satsynth_jax: error: ...` naming the file, key or value (other stderr
lines are absl log lines and progress bars), never a traceback; nothing is written under the
workdir when a setting is refused.
"""

import errno
import glob
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from conftest import REPO, TINY_G_RUN, config_flag, cpu_env, paper_method_flags, run_main

PREFIX = "satsynth_jax: error: "
RUN = "diffusion_x0"  # the demo's G: x0 prediction
TINY = {**TINY_G_RUN, "diffusion.train.keep_checkpoints": 5}


def cli(mode, workdir, overrides=None, *flags, config="demo", timeout=600):
  """The CLI on one CPU device, as a user runs it; the CompletedProcess, whatever its exit code."""
  cmd = [sys.executable, "-m", "satsynth_jax.main", f"--config=configs/{config}.py", *paper_method_flags(), f"--mode={mode}",
         f"--workdir={workdir}", *(config_flag(k, v) for k, v in (overrides or {}).items()), *flags]
  env = cpu_env(devices=1)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result, alone: bool = False) -> str:
  """The one `satsynth_jax: error:` line of a failed run (exit 2, no traceback); alone: stderr has nothing else."""
  assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(PREFIX)]
  assert len(errors) == 1, result.stderr[-3000:]
  if alone:
    assert lines == errors, result.stderr[-3000:]
  return errors[0]


def dead_pid() -> int:
  """The pid of a process that has exited (the kernel does not reuse it this soon)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# ---- settings refused before anything is written (issue items 2, 3, 4, 10) ----

@pytest.mark.parametrize("mode, overrides, expected", [
    ("sample", {"sample.examples_per_shard": 0}, "config.sample.examples_per_shard=0"),
    ("sample", {"sample.per_real": -1}, "config.sample.per_real=-1"),
    ("train_diffusion", {"diffusion.train.lr": -0.001}, "config.diffusion.train.lr=-0.001"),
    ("train_diffusion", {"diffusion.train.batch_size": 0}, "config.diffusion.train.batch_size=0"),
    ("train_diffusion", {"diffusion.train.checkpoint_every": 0}, "config.diffusion.train.checkpoint_every=0"),
    ("train_diffusion", {"diffusion.prediction": "foo"}, "config.diffusion.prediction='foo'"),
    ("sample", {"sample.sampler": "foo"}, "config.sample.sampler='foo'"),
    ("train_diffusion", {"diffusion.model.ch": 20}, "config.diffusion.model.ch=20: GroupNorm"),
])
def test_impossible_settings_fail_in_one_line_before_writing(tmp_path, mode, overrides, expected):
  workdir = tmp_path / "w"
  line = error_line(cli(mode, workdir, overrides, timeout=120), alone=True)
  assert expected in line
  assert not workdir.exists()


def test_batch_not_divisible_by_the_devices_fails_in_one_line(tmp_path):
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", *paper_method_flags(), "--mode=train_diffusion",
         f"--workdir={workdir}", config_flag("diffusion.train.batch_size", 6)]
  env = cpu_env(devices=4)
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  line = error_line(result, alone=True)
  assert "config.diffusion.train.batch_size=6: is not divisible by the 4 devices" in line
  assert not workdir.exists()


def test_empty_source_dir_fails_in_one_line(tmp_path):
  line = error_line(cli("prepare", tmp_path / "w", config="loveda", timeout=120), alone=True)
  assert "config.data.source_dir=''" in line
  assert not (tmp_path / "w").exists()


def test_bucket_workdir_fails_in_one_line():
  line = error_line(cli("prepare", "gs://bucket/run", timeout=120), alone=True)
  assert "--workdir=gs://bucket/run: bucket URLs are not supported" in line


# ---- filesystem errors inside a job (issue item 3) ----
# Tests run as root, for whom chmod does not stop writes; a path under a regular file fails
# for everyone (NotADirectoryError, an OSError like EROFS or ENOSPC).

def test_workdir_under_a_regular_file_fails_in_one_line_naming_the_path(tmp_path):
  (tmp_path / "file").write_text("not a folder")
  line = error_line(cli("prepare", tmp_path / "file" / "w", TINY, timeout=120))
  assert f"{tmp_path / 'file' / 'w'}" in line and "Not a directory" in line and "(during " in line


def test_an_unwritable_path_inside_a_job_names_the_path_and_the_operation(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "data").write_text("a file where prepare makes a folder")
  line = error_line(cli("prepare", workdir, TINY, timeout=120))
  assert f"{workdir / 'data'}" in line and "Not a directory" in line and "(during " in line
  assert not list((workdir / "locks").iterdir())  # the job's lock is released on the way out


def test_a_full_disk_is_named_with_its_file_and_operation(tmp_path):
  from satsynth_jax.infra import atomic, cli as command_line

  def full(file):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no file named

  with pytest.raises(OSError) as raised:
    atomic.write(tmp_path / "manifest.json", full)
  message = command_line.os_error_message(raised.value)
  assert message.startswith(f"{tmp_path / 'manifest.json'}: No space left on device (during ")
  assert "atomic.write" in message and message.endswith("free disk space or use another --workdir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the test above")
def test_read_only_workdir_fails_in_one_line(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  workdir.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    line = error_line(cli("prepare", workdir, TINY, timeout=120))
  finally:
    workdir.chmod(stat.S_IRWXU)
  assert str(workdir) in line and "Permission denied" in line


# ---- job locks (issue item 6) and orphaned temp files (item 9) ----

def _write_lock(workdir, kind, pid, mode=None):
  path = workdir / "locks" / f"{kind}.lock"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "mode": mode or kind,
                              "started": "2024-01-01T00:00:00+0000"}))
  return path


def test_a_second_job_of_the_same_kind_stops_naming_the_holder(tmp_path):
  workdir = tmp_path / "w"
  _write_lock(workdir, "prepare", os.getpid())  # this test's process: alive on this host
  line = error_line(cli("prepare", workdir, TINY, timeout=120))
  assert f"locks/prepare.lock: held by pid {os.getpid()} on host {socket.gethostname()}" in line
  assert not (workdir / "data").exists()


def test_the_experiment_takes_every_kind_of_lock(tmp_path):
  workdir = tmp_path / "w"
  _write_lock(workdir, "sample", os.getpid())
  line = error_line(cli("experiment", workdir, TINY, timeout=300))
  assert f"locks/sample.lock: held by pid {os.getpid()}" in line


def test_a_stale_lock_is_taken_over_and_released_after_the_job(tmp_path):
  workdir = tmp_path / "w"
  lock = _write_lock(workdir, "prepare", dead_pid())
  result = cli("prepare", workdir, TINY, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "taking over the stale lock" in result.stderr and "is not running" in result.stderr
  assert not lock.exists()
  assert (workdir / "data" / "train" / "manifest.json").exists()


def test_start_up_removes_temp_files_of_dead_writers_only(tmp_path):
  workdir = tmp_path / "w"
  host = socket.gethostname()
  (workdir / "data" / "train").mkdir(parents=True)
  orphan = workdir / "data" / "train" / f".manifest.json.{host}-{dead_pid()}.abcd1234.tmp"
  live = workdir / "data" / "train" / f".manifest.json.{host}-{os.getpid()}.efgh5678.tmp"
  other_host = workdir / f".plan.json.elsewhere-{dead_pid()}.ijkl9012.tmp"
  for path in (orphan, live, other_host):
    path.write_bytes(b"partial")
  result = cli("prepare", workdir, TINY, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not orphan.exists()
  assert live.exists() and other_host.exists()


# ---- damaged checkpoints (issue item 1) ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir holding prepared records and G's checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained")
  run_main("prepare", workdir, TINY, timeout=600)
  run_main("train_diffusion", workdir, TINY, timeout=900)
  steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints" / RUN) if p.isdigit())
  assert steps == [2, 4]
  return workdir


@pytest.fixture
def copy(trained, tmp_path):
  target = tmp_path / "w"
  shutil.copytree(trained, target, symlinks=True)
  return target


def _data_file(workdir, step: int, item: str) -> str:
  """The largest array-data file of `item` in a step (orbax's OCDBT store)."""
  files = glob.glob(str(workdir / "checkpoints" / RUN / str(step) / item / "ocdbt.process_*" / "d" / "*"))
  return max(files, key=os.path.getsize)


def _alter(path: str) -> None:
  """Invert the second half of the file's bytes: read back, it is garbage or an error."""
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data)):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_sampling_from_an_altered_checkpoint_fails_in_one_line(copy):
  _alter(_data_file(copy, 4, "inference"))
  line = error_line(cli("sample", copy, TINY))
  assert f"checkpoints/{RUN}/4: unreadable or damaged (" in line
  assert "re-run with --allow_checkpoint_fallback to use step 2" in line
  assert not glob.glob(str(copy / "synthetic" / "*" / "manifest.json"))


def test_with_the_fallback_flag_sampling_uses_the_previous_step_and_says_so(copy):
  _alter(_data_file(copy, 4, "inference"))
  result = cli("sample", copy, TINY, "--allow_checkpoint_fallback")
  assert result.returncode == 0, result.stderr[-3000:]
  skipped = [line for line in result.stderr.splitlines() if f"checkpoints/{RUN}/4 skipped" in line]
  assert len(skipped) == 1 and "trying step 2" in skipped[0], result.stderr[-3000:]
  [made] = [os.path.dirname(p) for p in glob.glob(str(copy / "synthetic" / "*" / "manifest.json"))]
  assert json.loads(open(os.path.join(made, "manifest.json")).read())["num_examples"] > 0
  assert json.loads(open(os.path.join(made, "config.json")).read())["shaping"]["checkpoint_step"] == 2


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resuming_from_a_truncated_or_deleted_checkpoint_file_fails_in_one_line(copy, damage):
  path = _data_file(copy, 4, "state")
  _truncate(path) if damage == "truncate" else os.unlink(path)
  line = error_line(cli("train_diffusion", copy, {**TINY, "diffusion.train.num_steps": 6}))
  assert f"checkpoints/{RUN}/4: unreadable or damaged (" in line
  assert "--allow_checkpoint_fallback to use step 2" in line


def test_num_classes_other_than_the_records_fails_in_one_line_and_records_nothing(trained, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(trained / "data", workdir / "data")
  seven = {**TINY, "data.num_classes": 7}
  flags = ["--config.data.class_names=('a','b','c','d','e','f','g')",
           "--config.data.palette=((1,1,1),(2,2,2),(3,3,3),(4,4,4),(5,5,5),(6,6,6),(7,7,7))"]
  line = error_line(cli("train_diffusion", workdir, seven, *flags))
  assert line.endswith(f"{workdir / 'data' / 'train'}: records have num_classes=6, but config.data.num_classes=7")
  assert not (workdir / "checkpoints" / RUN / "config.json").exists()  # the corrected command is not refused


def test_with_the_fallback_flag_training_resumes_from_the_previous_step(copy):
  _truncate(_data_file(copy, 4, "state"))
  result = cli("train_diffusion", copy, {**TINY, "diffusion.train.num_steps": 6}, "--allow_checkpoint_fallback")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"checkpoints/{RUN}/4 skipped" in result.stderr and "resumed from step 2" in result.stderr
  run = copy / "checkpoints" / RUN
  assert (run / "4.damaged").is_dir()  # kept for inspection, out of the way of the new step 4
  assert sorted(int(p) for p in os.listdir(run) if p.isdigit()) == [2, 4, 6]
