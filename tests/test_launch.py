"""launch/*.sh: help, refusal of missing or hostile settings, the commands they issue (stub gcloud/python),
what a worker's shell makes of them (the stub runs ssh commands through bash), shellcheck."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import time

import pytest

from conftest import REPO
from satsynth_jax.main import MODES

LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu_host.sh", "gpu_hosts.sh")
TPU = ["--project", "proj", "--zone", "us-central2-b", "--tpu", "satsynth"]
HOSTS = ["--coordinator", "10.0.0.1:12355", "--num_hosts", "2", "--host_index", "1", "--mode", "train_diffusion",
         "--config", "configs/demo.py", "--workdir", "/shared/run"]

# The launch scripts' mode list must be exactly the CLI's.
EXPECTED_MODES = tuple(MODES)

# Record each call's arguments (one per line, a blank line after each call); describe says ACTIVE.
# Then act like the TPU VM: `ssh --command=C` runs C through `bash -c` in the fake worker's home
# ($STUB_REMOTE, also $HOME there, with $STUB_REMOTE_BIN first on PATH) as sshd does with the login
# shell; `scp A NAME:B` / `scp NAME:A B` copy to / from that home.
GCLOUD_STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" >> "$STUB_LOG"; echo >> "$STUB_LOG"
if [[ " $* " == *" describe "* ]]; then echo ACTIVE; fi
command="" positional=()
for arg in "$@"; do
  case "$arg" in
    --command=*) command="${arg#--command=}" ;;
    -*) ;;
    *) positional+=("$arg") ;;
  esac
done
case "${positional[3]:-}" in
  ssh)
    cd "$STUB_REMOTE" || exit 97
    HOME="$STUB_REMOTE" PATH="$STUB_REMOTE_BIN:$PATH" exec bash -c "$command" ;;
  scp)
    source="${positional[4]}" target="${positional[5]}"
    if [[ "$source" == *:* ]]; then exec cp "$STUB_REMOTE/${source#*:}" "$target"; fi
    exec cp "$source" "$STUB_REMOTE/${target#*:}" ;;
esac
"""
# The venv's python (here and on the fake worker) also records where it runs and which GPUs it may see.
PYTHON_STUB = """#!/usr/bin/env bash
printf '%s\\n' "PWD=$PWD" "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" "$@" >> "$STUB_LOG"
echo >> "$STUB_LOG"
"""
# On the fake worker: sudo and pip only record their arguments (to $STUB_REMOTE_LOG, the program's
# name first); `python3 -m venv DIR` makes DIR/bin/pip such a recorder; nothing is mounted.
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0")" "$@" >> "$STUB_REMOTE_LOG"; echo >> "$STUB_REMOTE_LOG"
"""
REMOTE_BIN_STUBS = {
    "sudo": RECORDER,
    "mountpoint": "#!/usr/bin/env bash\nexit 1\n",
    "python3": f"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m venv" ]]; then
  mkdir -p "$3/bin"
  printf '%s' {shlex.quote(RECORDER)} > "$3/bin/pip"
  chmod +x "$3/bin/pip"
fi
""",
}


def write_executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def stub(tmp_path):
  """(env with stub gcloud on PATH, a stub venv python and a fake worker; the log of the local calls).

  The scripts run in tmp_path/local; the fake worker's home is tmp_path/remote with the checkout folder
  satsynth_jax/ and ~/satsynth_venv/bin/python recording to tmp_path/remote.log (see remote_calls).
  """
  local, remote = tmp_path / "local", tmp_path / "remote"
  local.mkdir()
  (remote / "satsynth_jax").mkdir(parents=True)
  write_executable(tmp_path / "bin" / "gcloud", GCLOUD_STUB)
  write_executable(tmp_path / "venv" / "bin" / "python", PYTHON_STUB)
  write_executable(remote / "satsynth_venv" / "bin" / "python",
                   PYTHON_STUB.replace("$STUB_LOG", "$STUB_REMOTE_LOG"))
  for name, text in REMOTE_BIN_STUBS.items():
    write_executable(tmp_path / "remote_bin" / name, text)
  log = tmp_path / "calls.log"
  env = {k: v for k, v in os.environ.items() if not k.startswith("SATSYNTH_")}
  env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", STUB_LOG=str(log),
             SATSYNTH_VENV=str(tmp_path / "venv"), STUB_LOCAL=str(local), STUB_REMOTE=str(remote),
             STUB_REMOTE_BIN=str(tmp_path / "remote_bin"), STUB_REMOTE_LOG=str(tmp_path / "remote.log"))
  return env, log


def launch(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=60,
                        cwd=env.get("STUB_LOCAL"))


def calls(log) -> list[list[str]]:
  if not log.exists():
    return []
  return [block.split("\n") for block in log.read_text().split("\n\n") if block]


def remote_calls(env, count: int = 0, wait_s: float = 0) -> list[list[str]]:
  """What ran on the fake worker; waits up to wait_s for `count` calls (a --detach job runs in the background)."""
  log = pathlib.Path(env["STUB_REMOTE_LOG"])
  deadline = time.monotonic() + wait_s
  while True:
    done = calls(log)
    if len(done) >= count or time.monotonic() > deadline:
      return done
    time.sleep(0.05)


def pwned(tmp_path) -> list:
  """Every file named PWNED that an injected `touch PWNED` could have made (locally, on the fake worker, here)."""
  found = list(tmp_path.rglob("PWNED"))
  found += [p for p in (REPO / "PWNED", REPO / "launch" / "PWNED", pathlib.Path.cwd() / "PWNED") if p.exists()]
  return found


def script_modes() -> list[str]:
  result = subprocess.run(["bash", "-c", 'source launch/common.sh && printf "%s\\n" "${SATSYNTH_MODES[@]}"'],
                          cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
  return result.stdout.split()


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
  env = {**env, "SATSYNTH_PROJECT": "proj", "SATSYNTH_ZONE": "europe-west4-a", "SATSYNTH_TPU": "satsynth"}
  assert launch("tpu_vm.sh", "delete", env=env).returncode == 0
  assert calls(log) == [["compute", "tpus", "tpu-vm", "delete", "satsynth", "--project=proj", "--zone=europe-west4-a",
                         "--quiet"]]


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
  remote = pathlib.Path(env["STUB_REMOTE"])
  assert remote_calls(env) == [[f"PWD={remote / 'satsynth_jax'}", "CUDA_VISIBLE_DEVICES=unset", "-m",
                                "satsynth_jax.main", "--distributed=on", "--mode=train_diffusion",
                                "--config=configs/demo.py", "--workdir=/mnt/satsynth/run one", *overrides]]


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
  [job] = remote_calls(env, 1, wait_s=20)
  assert job[2:] == ["-m", "satsynth_jax.main", "--distributed=on", "--mode=prepare", "--config=configs/demo.py",
                     "--workdir=/mnt/satsynth/run"]
  assert (pathlib.Path(env["STUB_REMOTE"]) / "satsynth_prepare.log").exists()


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
  assert "pip install -q 'jax[tpu]'" in command and "-e './satsynth_jax[gcs]'" in command
  assert "mount -t nfs -o rw,hard 10.0.0.2:/satsynth /mnt/satsynth" in command
  # On the worker: the checkout unpacked, the venv made and pip run, the share mounted.
  remote = pathlib.Path(env["STUB_REMOTE"])
  assert (remote / "satsynth_jax" / "launch" / "tpu_vm.sh").exists()
  assert remote_calls(env) == [
      ["sudo", "apt-get", "update", "-qq"], ["sudo", "apt-get", "install", "-y", "-qq", "python3-venv", "nfs-common"],
      ["pip", "install", "-q", "--upgrade", "pip"],
      ["pip", "install", "-q", "jax[tpu]", "-e", "./satsynth_jax[gcs]"],
      ["sudo", "mkdir", "-p", "/mnt/satsynth"],
      ["sudo", "mount", "-t", "nfs", "-o", "rw,hard", "10.0.0.2:/satsynth", "/mnt/satsynth"]]


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


# ---- hostile values: nothing they hold may run, on this machine or on a worker ----

RUN = ["run", *TPU, "--mode", "sample", "--config", "configs/demo.py", "--workdir", "/w"]
HOSTILE_WORKDIR = "/mnt/satsynth/my run $(touch PWNED) `touch PWNED` it's \"q\";touch PWNED;|touch PWNED&"
HOSTILE_OVERRIDES = ["--config.a=1;touch PWNED;", "--config.b=$(touch PWNED)", "--config.c=`touch PWNED`",
                     "--config.d='x' \"y\" z", "--config.e=a\\b|touch PWNED&", "--config.f=~/x * ?",
                     "--config.g=$HOME ${PATH} $((1+1))", "--config.h=", "--config.i=caf\u00e9 > out"]


def assert_refused_in_one_line(result, *needles):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
  for needle in needles:
    assert needle in result.stderr


def test_the_stub_gcloud_runs_ssh_commands_like_a_workers_shell(stub, tmp_path):
  """The check below is real: an unquoted `;touch PWNED` in --command would make the file."""
  env, _ = stub
  subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "satsynth", "--worker=all",
                  "--command=echo x;touch PWNED"], env=env, check=True, capture_output=True, timeout=30)
  assert pwned(tmp_path) == [tmp_path / "remote" / "PWNED"]


def test_the_mode_list_is_kept_once_in_common_sh_and_equals_mains():
  assert tuple(script_modes()) == EXPECTED_MODES
  for script in SCRIPTS:  # no second copy of the list: each script uses SATSYNTH_MODES from common.sh
    for number, line in enumerate((LAUNCH / script).read_text().splitlines(), 1):
      named = {word for word in re.findall(r"[a-z_]+", line) if word in EXPECTED_MODES}
      assert len(named) <= 2, f"{script}:{number} lists modes: {line}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_mode(script, stub):
  env, _ = stub
  result = launch(script, "--help", env=env)
  assert result.returncode == 0
  modes = result.stdout.split("Modes (--mode):\n", 1)[1].split("\n\n", 1)[0].split()
  assert tuple(modes) == EXPECTED_MODES


@pytest.mark.parametrize("mode", EXPECTED_MODES)
def test_every_known_mode_is_accepted(mode, stub):
  env, log = stub
  result = launch("tpu_vm.sh", "run", *TPU, "--mode", mode, "--config", "configs/demo.py", "--workdir", "/w", env=env)
  assert result.returncode == 0, result.stderr
  [call] = calls(log)
  assert ("--worker=0" if mode == "prepare" else "--worker=all") in call
  [job] = remote_calls(env)
  assert f"--mode={mode}" in job
  result = launch("gpu_host.sh", "run", "--mode", mode, "--config", "configs/demo.py", "--workdir", "w", env=env)
  assert result.returncode == 0, result.stderr
  assert f"--mode={mode}" in calls(log)[-1]


BAD_MODES = ["x;touch PWNED;", "$(touch PWNED)", "`touch PWNED`", "sample;touch PWNED", "sample' ; touch PWNED; '",
             "train diffusion", "pipeline", "Sample", "sample\ntouch PWNED", "--help"]


@pytest.mark.parametrize("mode", BAD_MODES, ids=range(len(BAD_MODES)))
@pytest.mark.parametrize("script, args", [
    ("tpu_vm.sh", ["run", *TPU, "--config", "configs/demo.py", "--workdir", "/w"]),
    ("tpu_vm.sh", ["run", *TPU, "--config", "configs/demo.py", "--workdir", "/w", "--detach"]),
    ("tpu_vm.sh", ["delete", *TPU]),
    ("gpu_host.sh", ["run", "--config", "configs/demo.py", "--workdir", "w"]),
    ("gpu_hosts.sh", HOSTS[:6] + HOSTS[8:]),
], ids=["tpu_run", "tpu_run_detach", "tpu_delete", "gpu_host", "gpu_hosts"])
def test_an_unknown_mode_stops_locally_in_one_line_naming_it(script, args, mode, stub, tmp_path):
  env, log = stub
  result = launch(script, *args, "--mode", mode, env=env)
  shown = f"'{mode}'" if "\n" not in mode else "$'sample\\ntouch PWNED'"  # control characters: as printf %q
  assert_refused_in_one_line(result, f"error: unknown --mode {shown}; use one of: {' '.join(EXPECTED_MODES)}")
  assert not calls(log) and not remote_calls(env)
  assert not pwned(tmp_path)


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
def test_hostile_workdir_config_and_overrides_reach_the_worker_as_literal_words(detach, stub, tmp_path):
  env, log = stub
  config = "configs/a b;touch PWNED;$(touch PWNED).py"
  result = launch("tpu_vm.sh", "run", *TPU, "--mode", "train_diffusion", "--config", config, "--workdir",
                  HOSTILE_WORKDIR, *(["--detach"] if detach else []), "--", *HOSTILE_OVERRIDES, env=env)
  assert result.returncode == 0, result.stderr
  assert len(calls(log)) == 1
  [job] = remote_calls(env, 1, wait_s=20 if detach else 0)
  assert job == [f"PWD={tmp_path / 'remote' / 'satsynth_jax'}", "CUDA_VISIBLE_DEVICES=unset", "-m",
                 "satsynth_jax.main", "--distributed=on", "--mode=train_diffusion", f"--config={config}",
                 f"--workdir={HOSTILE_WORKDIR}", *HOSTILE_OVERRIDES]
  assert not pwned(tmp_path)


@pytest.mark.parametrize("script, args", [
    ("gpu_host.sh", ["run", "--mode", "sample", "--config", "configs/demo.py"]),
    ("gpu_hosts.sh", HOSTS[:-2]),
], ids=["gpu_host", "gpu_hosts"])
def test_gpu_scripts_pass_hostile_values_as_literal_arguments(script, args, stub, tmp_path):
  env, log = stub
  result = launch(script, *args, "--workdir", HOSTILE_WORKDIR, "--", *HOSTILE_OVERRIDES, env=env)
  assert result.returncode == 0, result.stderr
  [call] = calls(log)
  assert call[-len(HOSTILE_OVERRIDES) - 1:] == [f"--workdir={HOSTILE_WORKDIR}", *HOSTILE_OVERRIDES]
  assert not pwned(tmp_path)


def test_a_hostile_nfs_share_is_mounted_as_one_word(stub, tmp_path):
  env, _ = stub
  share = "10.0.0.2:/share;touch PWNED; $(touch PWNED) `touch PWNED` it's"
  result = launch("tpu_vm.sh", "install", *TPU, "--nfs", share, env=env)
  assert result.returncode == 0, result.stderr
  assert remote_calls(env)[-1] == ["sudo", "mount", "-t", "nfs", "-o", "rw,hard", share, "/mnt/satsynth"]
  assert not pwned(tmp_path)


def test_fetch_copies_hostile_folder_names_back_as_they_are(stub, tmp_path):
  env, log = stub
  workdir = tmp_path / "remote" / "runs" / "a b $(touch PWNED) `touch PWNED` it's;touch PWNED;"
  odd = "odd;touch${IFS}PWNED;$(touch${IFS}PWNED)`touch${IFS}PWNED`'q'"
  for folder, name in (("metrics", "train.jsonl"), (odd, "f.txt")):
    (workdir / folder).mkdir(parents=True)
    (workdir / folder / name).write_text(folder)
  dest = tmp_path / "local" / "my results $(touch PWNED)"
  result = launch("tpu_vm.sh", "fetch", *TPU, "--workdir", str(workdir), "--what", f"metrics {odd} missing",
                  "--dest", str(dest), env=env)
  assert result.returncode == 0, result.stderr
  assert (dest / "metrics" / "train.jsonl").read_text() == "metrics"
  assert (dest / odd / "f.txt").read_text() == odd
  assert not (dest / "satsynth_results.tar.gz").exists()
  assert [call[3] for call in calls(log)] == ["ssh", "scp"]
  assert not pwned(tmp_path)


@pytest.mark.parametrize("args, needle", [
    (["delete", *TPU[:4], "--tpu", "satsynth;touch PWNED"], "--tpu must be"),
    (["delete", *TPU[:4], "--tpu", "--command=touch PWNED"], "--tpu must be"),
    (["delete", *TPU[:4], "--tpu", "Satsynth"], "--tpu must be"),
    (["delete", "--project", "proj", "--zone", "us-central2-b;touch PWNED", *TPU[4:]], "--zone must be"),
    (["delete", "--project", "$(touch PWNED)", *TPU[2:]], "--project must be"),
    (["create", *TPU, "--accelerator_type", "v4-8 --spot", "--runtime_version", "v"], "--accelerator_type must be"),
    (["create", *TPU, "--accelerator_type", "v4-8", "--runtime_version", "x;touch PWNED"], "--runtime_version must"),
    (["create", *TPU, "--accelerator_type", "v4-8", "--runtime_version", "v", "--queued", "--wait_minutes",
      "a[$(touch PWNED)]"], "--wait_minutes must be an integer >= 1"),
    (["install", *TPU, "--nfs", "-o remount"], "--nfs must be SERVER:/EXPORT"),
    (["install", *TPU, "--nfs", "10.0.0.2"], "--nfs must be SERVER:/EXPORT"),
    (["install", *TPU, "--nfs", "10.0.0.2:/x\ntouch PWNED"], "--nfs must be SERVER:/EXPORT"),
    (["run", *TPU, "--mode", "sample", "--config", "configs/demo.py", "--workdir", "-rf"], "--workdir must not"),
    (["run", *TPU, "--mode", "sample", "--config", "configs/demo.py", "--workdir", "/w\ntouch PWNED"],
     "--workdir must not"),
    (["run", *TPU, "--mode", "sample", "--config", "--help", "--workdir", "/w"], "--config must not"),
    ([*RUN, "--", "--config.x=1\ntouch PWNED"], "flags after -- must not contain control characters"),
    (["fetch", *TPU, "--workdir", "/w", "--what", "metrics --to-command=touch${IFS}PWNED"], "--what must not"),
    (["fetch", *TPU, "--workdir", "/w", "--what", "metrics\ntouch PWNED"], "--what must not"),
])
def test_hostile_names_and_option_like_values_are_refused_before_gcloud(args, needle, stub, tmp_path):
  env, log = stub
  assert_refused_in_one_line(launch("tpu_vm.sh", *args, env=env), needle)
  assert not calls(log) and not remote_calls(env)
  assert not pwned(tmp_path)


@pytest.mark.parametrize("script, args, needle", [
    ("gpu_host.sh", ["run", "--mode", "sample", "--config", "c", "--workdir", "w", "--gpus", "0;touch PWNED"],
     "--gpus must be"),
    ("gpu_hosts.sh", HOSTS[:2] + ["--num_hosts", "a[$(touch PWNED)]"] + HOSTS[4:],
     "--num_hosts must be an integer >= 1"),
    ("gpu_hosts.sh", HOSTS[:4] + ["--host_index", "0;touch PWNED"] + HOSTS[6:], "--host_index must be an integer"),
])
def test_gpu_scripts_refuse_hostile_settings(script, args, needle, stub, tmp_path):
  env, log = stub
  assert_refused_in_one_line(launch(script, *args, env=env), needle)
  assert not calls(log)
  assert not pwned(tmp_path)


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) == len(SCRIPTS) + 1  # and common.sh, which they source
  result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout
