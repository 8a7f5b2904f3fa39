"""launch/*.sh: help, refusal of missing settings, the commands they issue (stub gcloud/python), shellcheck."""

import os
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu_host.sh", "gpu_hosts.sh")
TPU = ["--project", "proj", "--zone", "us-central2-b", "--tpu", "satsynth"]
HOSTS = ["--coordinator", "10.0.0.1:12355", "--num_hosts", "2", "--host_index", "1", "--mode", "train_diffusion",
         "--config", "configs/demo.py", "--workdir", "/shared/run"]

# Record each call's arguments (one per line, a blank line after each call); describe says ACTIVE.
GCLOUD_STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" >> "$STUB_LOG"; echo >> "$STUB_LOG"
if [[ " $* " == *" describe "* ]]; then echo ACTIVE; fi
"""
# The venv's python also records where it runs and which GPUs it may see.
PYTHON_STUB = """#!/usr/bin/env bash
printf '%s\\n' "PWD=$PWD" "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" "$@" >> "$STUB_LOG"
echo >> "$STUB_LOG"
"""


@pytest.fixture
def stub(tmp_path):
  """(env with stub gcloud on PATH and a stub venv python, the log of their calls)."""
  bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
  for directory, name, text in ((bin_dir, "gcloud", GCLOUD_STUB), (venv_bin, "python", PYTHON_STUB)):
    directory.mkdir(parents=True)
    (directory / name).write_text(text)
    (directory / name).chmod(0o755)
  log = tmp_path / "calls.log"
  env = {k: v for k, v in os.environ.items() if not k.startswith("SATSYNTH_")}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_LOG=str(log), SATSYNTH_VENV=str(tmp_path / "venv"))
  return env, log


def launch(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=60)


def calls(log) -> list[list[str]]:
  if not log.exists():
    return []
  return [block.split("\n") for block in log.read_text().split("\n\n") if block]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_shows_usage(script, stub):
  env, log = stub
  for flag in ("--help", "-h"):
    result = launch(script, flag, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: launch/{script}") and "Example" in result.stdout
  assert not calls(log)


@pytest.mark.parametrize("script, args, missing", [
    ("tpu_vm.sh", [], "missing COMMAND"),
    ("tpu_vm.sh", ["create"], "missing setting --project (or environment variable SATSYNTH_PROJECT)"),
    ("tpu_vm.sh", ["create", "--project", "p"], "missing setting --zone"),
    ("tpu_vm.sh", ["create", "--project", "p", "--zone", "z"], "missing setting --tpu"),
    ("tpu_vm.sh", ["create", *TPU], "missing setting --accelerator_type"),
    ("tpu_vm.sh", ["create", *TPU, "--accelerator_type", "v4-8"], "missing setting --runtime_version"),
    ("tpu_vm.sh", ["run", *TPU, "--config", "configs/demo.py", "--workdir", "/w"], "missing setting --mode"),
    ("tpu_vm.sh", ["run", *TPU, "--mode", "sample", "--workdir", "/w"], "missing setting --config"),
    ("tpu_vm.sh", ["fetch", *TPU], "missing setting --workdir"),
    ("tpu_vm.sh", ["launch", *TPU], "unknown COMMAND 'launch'"),
    ("gpu_host.sh", ["run", "--config", "c", "--workdir", "w"], "missing setting --mode"),
    ("gpu_host.sh", ["run", "--mode", "sample", "--config", "c"], "missing setting --workdir"),
    ("gpu_hosts.sh", HOSTS[2:], "missing setting --coordinator (or environment variable SATSYNTH_COORDINATOR)"),
    ("gpu_hosts.sh", HOSTS[:2] + HOSTS[4:], "missing setting --num_hosts"),
    ("gpu_hosts.sh", HOSTS[:4] + HOSTS[6:], "missing setting --host_index"),
    ("gpu_hosts.sh", HOSTS[:-2], "missing setting --workdir"),
    ("gpu_hosts.sh", HOSTS[:5] + ["2"] + HOSTS[6:], "--host_index must be below --num_hosts=2"),
    ("gpu_hosts.sh", ["--coordinator", "10.0.0.1"] + HOSTS[2:], "--coordinator must be HOST:PORT"),
])
def test_missing_or_bad_settings_are_refused_by_name_before_any_call(script, args, missing, stub):
  env, log = stub
  result = launch(script, *args, env=env)
  assert result.returncode != 0
  assert missing in result.stderr
  assert not calls(log)


def test_settings_may_come_from_the_environment(stub):
  env, log = stub
  env = {**env, "SATSYNTH_PROJECT": "proj", "SATSYNTH_ZONE": "z", "SATSYNTH_TPU": "satsynth"}
  assert launch("tpu_vm.sh", "delete", env=env).returncode == 0
  assert calls(log) == [["compute", "tpus", "tpu-vm", "delete", "satsynth", "--project=proj", "--zone=z", "--quiet"]]


def test_tpu_run_starts_the_mode_on_every_worker_with_overrides_quoted(stub):
  env, log = stub
  overrides = ["--config.train.batch_size=256", "--config.data.class_names=('a b', \"c's\")"]
  result = launch("tpu_vm.sh", "run", *TPU, "--mode", "train_diffusion", "--config", "configs/demo.py",
                  "--workdir", "/mnt/satsynth/run one", "--", *overrides, env=env)
  assert result.returncode == 0, result.stderr
  [call] = calls(log)
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "satsynth"]
  assert "--worker=all" in call
  command = next(arg for arg in call if arg.startswith("--command=")).removeprefix("--command=")
  prefix = "cd ~/satsynth_jax && "
  assert command.startswith(prefix)
  assert shlex.split(command[len(prefix):]) == [
      "~/satsynth_venv/bin/python", "-m", "satsynth_jax.main", "--distributed=on", "--mode=train_diffusion",
      "--config=configs/demo.py", "--workdir=/mnt/satsynth/run one", *overrides]


def test_tpu_prepare_runs_on_worker_0_only_and_detach_logs_to_a_file(stub):
  env, log = stub
  result = launch("tpu_vm.sh", "run", *TPU, "--mode", "prepare", "--config", "configs/demo.py", "--workdir",
                  "/mnt/satsynth/run", "--detach", env=env)
  assert result.returncode == 0, result.stderr
  [call] = calls(log)
  assert "--worker=0" in call
  command = next(arg for arg in call if arg.startswith("--command="))
  assert command.startswith("--command=nohup setsid bash -c ") and "> ~/satsynth_prepare.log 2>&1" in command
  assert "tail -f ~/satsynth_prepare.log" in result.stdout


def test_tpu_create_queued_waits_until_active(stub):
  env, log = stub
  result = launch("tpu_vm.sh", "create", *TPU, "--accelerator_type", "v4-32", "--runtime_version",
                  "tpu-ubuntu2204-base", "--queued", "--spot", env=env)
  assert result.returncode == 0, result.stderr
  create, describe = calls(log)
  assert create[:5] == ["compute", "tpus", "queued-resources", "create", "satsynth"]
  assert {"--node-id=satsynth", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
          "--spot"} <= set(create)
  assert describe[:4] == ["compute", "tpus", "queued-resources", "describe"]
  assert "queued resource satsynth: ACTIVE" in result.stdout


def test_tpu_install_copies_the_checkout_to_all_workers_and_mounts_nfs(stub):
  env, log = stub
  result = launch("tpu_vm.sh", "install", *TPU, "--nfs", "10.0.0.2:/satsynth", env=env)
  assert result.returncode == 0, result.stderr
  scp, ssh = calls(log)
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[4].endswith("satsynth_jax.tar.gz")
  assert scp[5] == "satsynth:satsynth_jax.tar.gz" and "--worker=all" in scp
  assert not os.path.exists(scp[4])  # the local archive is removed afterwards
  assert ssh[3] == "ssh" and "--worker=all" in ssh
  command = next(arg for arg in ssh if arg.startswith("--command="))
  assert "pip install -q 'jax[tpu]'" in command and "-e ./satsynth_jax" in command
  assert "mount -t nfs -o rw,hard 10.0.0.2:/satsynth /mnt/satsynth" in command


def test_gpu_hosts_starts_one_distributed_process_per_host(stub):
  env, log = stub
  result = launch("gpu_hosts.sh", *HOSTS, "--", "--config.train.batch_size=64", env=env)
  assert result.returncode == 0, result.stderr
  assert calls(log) == [[f"PWD={REPO}", "CUDA_VISIBLE_DEVICES=unset", "-m", "satsynth_jax.main", "--distributed=on",
                         "--coordinator_address=10.0.0.1:12355", "--num_processes=2", "--process_id=1",
                         "--mode=train_diffusion", "--config=configs/demo.py", "--workdir=/shared/run",
                         "--config.train.batch_size=64"]]


def test_gpu_host_runs_one_process_on_the_chosen_gpus(stub):
  env, log = stub
  result = launch("gpu_host.sh", "run", "--mode", "sample", "--config", "configs/demo.py", "--workdir", "w",
                  "--gpus", "0,1", env=env)
  assert result.returncode == 0, result.stderr
  assert calls(log) == [[f"PWD={REPO}", "CUDA_VISIBLE_DEVICES=0,1", "-m", "satsynth_jax.main", "--distributed=off",
                         "--mode=sample", "--config=configs/demo.py", "--workdir=w"]]


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) == len(SCRIPTS) + 1  # and common.sh, which they source
  result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout
