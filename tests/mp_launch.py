"""Launch a CLI job on several local processes (jax.distributed over a loopback coordinator).

Shared by the 2-process tests. Robust under load: a coordinator port taken by someone else
between picking and binding, or gloo's fixed 30 s wait running out, is retried on a new port;
a failed process ends the launch at once (the others are killed) rather than at the time limit.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env, paper_method_flags

NUM_PROCESSES = 2
# A launch (start-up, compile, a few steps) takes 15-60 s on the 2 shared cores and about 150 s
# at load average 10; the limit only ends a hung launch, so it is wide.
TIMEOUT_S = 600
PORT_IN_USE = ("address already in use", "failed to bind", "errno 98", "failed to add port")
# Gloo gives a process 30 s (fixed in jaxlib) to join the others at a new collective. JAX writes its
# persistent compile cache from process 0 only and process 1 misses it, so with a warm cache
# process 0 would start stepping while process 1 still compiles; the CLI therefore turns the cache
# off for multi-process CPU runs (main.py), and launch_ok checks that it did. Should a slow start
# on a loaded machine still run out, the launch is ended at once and relaunched.
GLOO_TIMEOUT = "gloo context initialization failed"
CACHE_OFF = "persistent compilation cache off"
RETRIED = PORT_IN_USE + (GLOO_TIMEOUT,)
ATTEMPTS = 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, mode: str, flags: list[str], log_prefix: pathlib.Path, port: int, via_env: bool, more_env):
  address = f"127.0.0.1:{port}"
  procs = []
  for index in range(NUM_PROCESSES):
    env = cpu_env(devices=2, JAX_PLATFORMS="cpu", **(more_env or {}))
    args = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", *paper_method_flags(), f"--workdir={workdir}",
            f"--mode={mode}", *flags]
    if via_env:
      env.update(SATSYNTH_COORDINATOR=address, SATSYNTH_NUM_PROCESSES=str(NUM_PROCESSES),
                 SATSYNTH_PROCESS_ID=str(index))
    else:
      args += [f"--coordinator_address={address}", f"--num_processes={NUM_PROCESSES}", f"--process_id={index}"]
    log = pathlib.Path(f"{log_prefix}_{index}.log")
    with open(log, "wb") as out:
      procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log))
  return procs


def _gloo_timed_out(procs) -> bool:
  return any(GLOO_TIMEOUT in log.read_text(errors="replace").lower() for _, log in procs)


def _wait(procs, deadline: float, stop_on_failure: bool) -> None:
  try:
    polls = 0
    while [p.poll() for p, _ in procs].count(None) and time.monotonic() < deadline:
      if stop_on_failure and any(p.returncode not in (None, 0) for p, _ in procs):
        break  # the others would wait for the failed one until their own timeouts
      polls += 1
      if polls % 10 == 0 and _gloo_timed_out(procs):
        break  # the peer then waits minutes for its own connect timeout, and process 0 at shutdown
      time.sleep(0.2)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def launch(workdir, mode: str, overrides: dict, logs: pathlib.Path, *, via_env: bool = False, on_started=None,
           started=None, stop_on_failure: bool = True, timeout_s: float = TIMEOUT_S,
           env: dict | None = None) -> list[tuple[int, str]]:
  """Runs `mode` on NUM_PROCESSES processes; [(exit code, log text)] per process.

  on_started(popens) is called once started() is true (polled every 50 ms), e.g. to signal one.
  env: more environment variables for the processes.
  """
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]  # str((1,)) keeps the tuple comma
  for attempt in range(ATTEMPTS):
    procs = _start(workdir, mode, flags, logs / f"{mode}_{attempt}", free_port(), via_env, env)
    deadline = time.monotonic() + timeout_s
    if on_started is not None:
      while time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
        if started():
          on_started([p for p, _ in procs])
          break
        time.sleep(0.05)
    _wait(procs, deadline, stop_on_failure)
    results = [(p.returncode, log.read_text(errors="replace")) for p, log in procs]
    if not any(code != 0 and any(s in text.lower() for s in RETRIED) for code, text in results):
      return results
  return results


def fail(message: str, results) -> None:
  tails = "\n".join(f"--- process {i} (exit {code}):\n{text[-3000:]}" for i, (code, text) in enumerate(results))
  pytest.fail(f"{message}\n{tails}")


def launch_ok(workdir, mode: str, overrides: dict, logs: pathlib.Path, **kwargs) -> list[str]:
  """launch() that must succeed on every process; returns the logs."""
  results = launch(workdir, mode, overrides, logs, **kwargs)
  if any(code != 0 for code, _ in results):
    fail(f"{mode} on {NUM_PROCESSES} processes failed or ran past its time limit", results)
  if not all(CACHE_OFF in text for _, text in results):
    fail("a multi-process CPU run kept the persistent compilation cache (main.py turns it off)", results)
  return [text for _, text in results]


def assert_states_match(two: dict, one: dict, names) -> None:
  """Each named tree of a 2-process run's state equals the 1-process run's, leaf by leaf.

  The runs sum gradients in different orders; Adam divides by sqrt(v), so a parameter whose
  gradient is ~0 takes a rounding-noise-sized step in either run: atol is 5% of one step at
  lr=1e-3, far below what a wrong batch would cause.
  """
  import jax  # noqa: PLC0415  (kept off the launcher's import path)
  import numpy as np  # noqa: PLC0415
  for name in names:
    leaves_a, leaves_b = jax.tree.leaves(two[name]), jax.tree.leaves(one[name])
    assert len(leaves_a) == len(leaves_b) > 0, name
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-5, err_msg=name)


def assert_logs_match(two: list[dict], one: list[dict], steps: list[int], atol: float) -> None:
  """The 2-process run's logged metrics equal the 1-process run's at the same steps (float32
  reduction-order error only)."""
  assert [m["step"] for m in two] == [m["step"] for m in one] == steps
  for a, b in zip(two, one):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=atol), key
