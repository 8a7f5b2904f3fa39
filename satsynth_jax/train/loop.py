"""The one training loop every model uses: mesh, sharded state, jitted step, checkpoints, logs.

A model plugs in as a `Task`: a pure `init(rng) -> TrainState`, a pure
`step(state, batch) -> (state, metrics)`, a factory for its per-process batch iterator
and an optional `preview(state, step)` (e.g. a PNG grid of EMA samples).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Any, Callable

import jax
from absl import logging
from tqdm import tqdm

from satsynth_jax import checkpoint, parallel
from satsynth_jax.errors import SatSynthError
from satsynth_jax.metric_writer import MetricWriter
from satsynth_jax.train.state import TrainState


class NonFiniteLossError(SatSynthError, FloatingPointError):
  """Loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(SatSynthError, RuntimeError):
  """SIGTERM/SIGINT arrived; a checkpoint of the current step was saved first."""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # checkpoint folder <workdir>/checkpoints/<name>/ and metrics file prefix
  init: Callable[[jax.Array], TrainState]
  step: Callable[[TrainState, Any], tuple[TrainState, dict]]
  make_batches: Callable[[], Any]  # -> grain DatasetIterator of per-process NumPy batches
  preview: Callable[[TrainState, int], None] | None = None


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then saves and stops)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(task: Task, t, workdir: str, *, seed: int, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Run (or resume) `task` to `t.num_steps`; returns the final state.

  `t` is a train config section: batch_size (global), num_steps, log_every,
  checkpoint_every, keep_checkpoints, sample_every. `mesh` defaults to all devices.
  """
  mesh = mesh or parallel.make_mesh()
  parallel.per_process_batch_size(t.batch_size, "train.batch_size", mesh)
  replicated, batched = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  is_writer = jax.process_index() == 0

  batches = task.make_batches()
  ckpt_dir = checkpoint.checkpoint_dir(workdir, task.name)
  mngr = checkpoint.manager(ckpt_dir, max_to_keep=t.keep_checkpoints)
  if mngr.latest_step() is not None:  # restore into shapes only: no init to compile or run
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(task.init, jax.random.key(seed)))
    state, _ = checkpoint.restore(mngr, abstract, data_iter=batches)
    logging.info("%s: resumed from step %d (%s)", task.name, int(state.step), ckpt_dir)
  else:
    state = jax.jit(task.init, out_shardings=replicated)(jax.random.key(seed))
  step_fn = jax.jit(task.step, in_shardings=(replicated, batched), out_shardings=(replicated, replicated),
                    donate_argnums=0)

  writer = MetricWriter(f"{workdir}/metrics", task.name, enabled=is_writer)
  start = int(state.step)
  bar = tqdm(total=t.num_steps, initial=start, desc=task.name, unit="step", disable=not is_writer,
             dynamic_ncols=True, mininterval=2.0)
  try:
    with jax.set_mesh(mesh), _StopRequest() as stop:
      for step in range(start + 1, t.num_steps + 1):
        state, metrics = step_fn(state, parallel.to_global(next(batches), mesh))
        bar.update(1)
        last = step == t.num_steps or stop.signal_name is not None
        save = last or step % t.checkpoint_every == 0
        if save or step % t.log_every == 0:  # fetch only here: the step stays asynchronous
          values = parallel.to_host(metrics)
          if not all(math.isfinite(float(v)) for v in values.values()):
            raise NonFiniteLossError(
                f"{task.name}: non-finite metrics at step {step}: {values}; stopped without saving. "
                f"Last good checkpoint: step {mngr.latest_step()} in {ckpt_dir}. "
                f"Lower train.lr or raise train.warmup_steps, then re-run to resume from it.")
          writer.scalars(step, values)
          bar.set_postfix(loss=f"{float(values['loss']):.4f}", refresh=False)
        if save:
          checkpoint.save(mngr, step, state, batches, {"step": step, "task": task.name})
        if task.preview is not None and t.sample_every and (step % t.sample_every == 0 or last):
          task.preview(state, step)
        if stop.signal_name is not None:
          mngr.wait_until_finished()
          raise TrainingInterrupted(
              f"{task.name}: {stop.signal_name} at step {step}; checkpoint saved in {ckpt_dir}. "
              f"Re-run the same command to resume.")
  finally:
    bar.close()
    writer.close()
    mngr.wait_until_finished()
  return state
