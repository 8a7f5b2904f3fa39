"""Preemption across processes: SIGTERM to one of two processes stops both at the same step.

Two local processes (2 CPU devices each, gloo collectives) train G through the real CLI;
only process 1 gets SIGTERM. JAX's preemption sync manager (started by
jax.distributed.initialize) agrees on the step, both save it and exit with the interrupted
message, and a rerun finishes with the same parameters and losses as an uninterrupted run.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, config_flag, load_config
from satsynth_jax import checkpoint, parallel, workdir as layout
from satsynth_jax.data import prepare
from satsynth_jax.train import diffusion, loop

NUM_PROCESSES = 2
# The signal goes out after step 1; the agreed stop lands about a second later (JAX's notifier
# polls once a second): 2-3 steps on the 2 shared cores under load (0.45 s a step), some 30
# on an idle machine. 80 steps leave room for both.
NUM_STEPS = 80
# Per launch. Measured on the 2 shared cores under load (load average 5): start-up and
# compile 15 s, then 2.2 steps/s, so a whole run takes about 50 s; the rest is headroom.
TIMEOUT_S = 300
RUN = "diffusion_x0"
TINY = {
    "diffusion.model.ch": 32, "diffusion.model.ch_mult": (1,), "diffusion.model.num_res_blocks": 1,
    "diffusion.model.attn_resolutions": (), "diffusion.timesteps": 50, "data.image_size": 8, "data.patch_size": 32,
    "data.demo_num_scenes": 2, "data.demo_scene_size": 64, "data.read_threads": 1, "diffusion.train.batch_size": 8,
    "diffusion.train.num_steps": NUM_STEPS, "diffusion.train.lr": 1e-3, "diffusion.train.warmup_steps": 2,
    "diffusion.train.log_every": 1, "diffusion.train.checkpoint_every": NUM_STEPS,
    "diffusion.train.sample_every": 0,
}
PORT_IN_USE = ("address already in use", "failed to bind", "errno 98")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, logs: pathlib.Path, tag: str, port: int) -> list[tuple[subprocess.Popen, pathlib.Path]]:
  procs = []
  for index in range(NUM_PROCESSES):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
            "--mode=train_diffusion", *(config_flag(k, v) for k, v in TINY.items()),
            f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={NUM_PROCESSES}", f"--process_id={index}"]
    log = logs / f"{tag}_{index}.log"
    with open(log, "wb") as out:
      procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, deadline: float) -> None:
  try:
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def _launch(workdir, logs: pathlib.Path, tag: str, on_started=None) -> list[tuple[int, str]]:
  """Train on NUM_PROCESSES local processes; [(exit code, log)] per process. `on_started(procs)` is
  called once process 0 has logged its first metrics. A coordinator port taken in the meantime
  by someone else is retried on a new port."""
  for attempt in range(3):
    procs = _start(workdir, logs, f"{tag}{attempt}", _free_port())
    deadline = time.monotonic() + TIMEOUT_S
    if on_started is not None:
      metrics = pathlib.Path(workdir) / "metrics" / f"{RUN}.jsonl"
      while time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
        if metrics.exists() and metrics.read_text().strip():
          on_started([p for p, _ in procs])
          break
        time.sleep(0.05)
    _wait(procs, deadline)
    results = [(p.returncode, log.read_text(errors="replace")) for p, log in procs]
    if not any(code not in (0, 2) and any(s in text.lower() for s in PORT_IN_USE) for code, text in results):
      return results
  return results


def _fail(message, results):
  tails = "\n".join(f"--- process {i} (exit {code}):\n{text[-3000:]}" for i, (code, text) in enumerate(results))
  pytest.fail(f"{message}\n{tails}")


def _final(config, workdir):
  mesh = parallel.make_mesh()
  task = diffusion.make_task(config, str(workdir), mesh)
  mngr = checkpoint.manager(layout.checkpoint_dir(str(workdir), task.name), create=False)
  state, _ = checkpoint.restore(mngr, loop.abstract_state(task, mesh, config.seed))
  assert int(state.step) == NUM_STEPS
  return parallel.to_host({"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state})


def _losses(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics", f"{RUN}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_matches(tmp_path):
  config = load_config("demo", **TINY)
  prepared = tmp_path / "prepared"
  prepare.run(config, str(prepared))
  interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
  shutil.copytree(prepared, interrupted)
  shutil.copytree(prepared, reference)
  logs = tmp_path / "logs"
  logs.mkdir()

  def terminate_process_1(procs):
    procs[1].send_signal(signal.SIGTERM)

  results = _launch(interrupted, logs, "interrupted", on_started=terminate_process_1)
  if [code for code, _ in results] != [2] * NUM_PROCESSES:
    _fail("both processes should stop with exit code 2", results)
  steps = []
  for code, text in results:
    found = re.findall(r"satsynth_jax: error: diffusion_x0: stop agreed by all 2 processes \(SIGTERM or SIGINT on "
                       r"one of them\) at step (\d+); checkpoint saved", text)
    if len(found) != 1:
      _fail("each process should print the interrupted message once", results)
    steps.append(int(found[0]))
  assert steps[0] == steps[1] < NUM_STEPS, steps
  assert checkpoint.latest_step(layout.checkpoint_dir(str(interrupted), RUN)) == steps[0]

  results = _launch(interrupted, logs, "resumed")
  if [code for code, _ in results] != [0] * NUM_PROCESSES:
    _fail("the rerun should finish", results)
  assert f"resumed from step {steps[0]}" in results[0][1]
  results = _launch(reference, logs, "reference")
  if [code for code, _ in results] != [0] * NUM_PROCESSES:
    _fail("the uninterrupted run should finish", results)

  # The interrupted run also logged its stop step; every step the reference logged matches exactly.
  resumed_log = {m["step"]: m for m in _losses(interrupted)}
  reference_log = _losses(reference)
  assert len(reference_log) == NUM_STEPS
  assert [resumed_log.get(m["step"]) for m in reference_log] == reference_log
  resumed, uninterrupted = _final(config, interrupted), _final(config, reference)
  for name in ("params", "ema_params", "opt_state"):
    for x, y in zip(jax.tree.leaves(resumed[name]), jax.tree.leaves(uninterrupted[name]), strict=True):
      np.testing.assert_array_equal(x, y, err_msg=name)
