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

import jax
import numpy as np

import mp_launch
from conftest import TINY_G_RUN, load_config
from satsynth_jax.infra import checkpoint, parallel, workdir as layout
from satsynth_jax.jobs import prepare
from satsynth_jax.train import diffusion, loop

NUM_PROCESSES = mp_launch.NUM_PROCESSES
# The signal goes out after step 1; the agreed stop lands about a second later (JAX's notifier
# polls once a second): 2-3 steps on the 2 shared cores under load (0.45 s a step), some 30
# on an idle machine. 80 steps leave room for both.
NUM_STEPS = 80
# Per launch; it only ends a hung launch. Measured on the 2 shared cores: start-up and compile
# 15 s, then 2.2 steps/s at load average 5 (a run about 50 s); at load 10 about 3x that.
TIMEOUT_S = 600
RUN = "diffusion_x0"
TINY = {**TINY_G_RUN, "diffusion.train.num_steps": NUM_STEPS, "diffusion.train.log_every": 1,
        "diffusion.train.checkpoint_every": NUM_STEPS}


def _launch(workdir, logs: pathlib.Path, tag: str, on_started=None) -> list[tuple[int, str]]:
  """Train on NUM_PROCESSES local processes; [(exit code, log)] per process. `on_started(procs)` is
  called once process 0 has logged its first metrics. Exit code 2 (the interrupted message) is
  expected of both, so neither stops the other's wait."""
  metrics = pathlib.Path(workdir) / "metrics" / f"{RUN}.jsonl"
  tagged = logs / tag
  tagged.mkdir()
  return mp_launch.launch(workdir, "train_diffusion", TINY, tagged, on_started=on_started,
                          started=lambda: metrics.exists() and bool(metrics.read_text().strip()),
                          stop_on_failure=on_started is None, timeout_s=TIMEOUT_S)


_fail = mp_launch.fail


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
