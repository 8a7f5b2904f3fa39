"""The one training loop every model uses: mesh, sharded state, jitted step, checkpoints, logs.

A model plugs in as a `Task`: a pure `init(rng) -> TrainState`, a pure
`step(state, batch) -> (state, metrics)`, a factory for its per-process batch iterator,
an optional `preview(state, step)` (e.g. a PNG grid of EMA samples) and an optional
`evaluate(state) -> {name: value}` logged every `eval_every` steps (e.g. val mIoU).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from satsynth_jax.infra import checkpoint, identity, parallel, workdir as layout
from satsynth_jax.infra.errors import SatSynthError
from satsynth_jax.infra.metric_writer import MetricWriter
from satsynth_jax.train.state import TrainState


class NonFiniteLossError(SatSynthError, FloatingPointError):
  """Loss became NaN/inf; the message names the step, where the run started and its newest checkpoint."""


class TrainingInterrupted(SatSynthError, RuntimeError):
  """SIGTERM/SIGINT arrived; a checkpoint of the current step was saved first."""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # the run: checkpoint folder <workdir>/checkpoints/<name>/ and metrics file prefix
  init: Callable[[jax.Array], TrainState]
  step: Callable[[TrainState, Any], tuple[TrainState, dict]]
  make_batches: Callable[[], Any]  # -> grain DatasetIterator of per-process NumPy batches
  preview: Callable[[TrainState, int], None] | None = None
  # Run on every process at steps that are multiples of eval_every (0: never); only logged.
  evaluate: Callable[[TrainState], dict[str, float]] | None = None
  eval_every: int = 0
  # Compiles the programs `preview` and `evaluate` will run, for a state of the given shapes
  # (ShapeDtypeStructs); a fresh run calls it while its step compiles (init_while_step_compiles).
  warm_up: Callable[[Any], None] | None = None
  # The run's identity (infra/identity.py): the resolved config and the settings that shape the run,
  # recorded beside its checkpoints; resuming under other shaping settings is refused. A function,
  # called when training starts: the shaping names the prepared data, which a task built only to
  # time or inspect its step never reads.
  config: Any = None
  shaping: Callable[[], dict] | None = None


class _StopRequest:
  """Turns SIGTERM/SIGINT into a stop at a step every process agrees on; the loop saves there and stops.

  One process: a Python handler sets a flag the loop reads between steps (no extra cost).
  Several processes: each sees only its own signal, and one stopping alone would leave the
  others waiting in a collective, so the stop step must be agreed. jax.distributed.initialize
  starts JAX's preemption sync manager, whose own handler catches SIGTERM and spreads the
  notice; `reached_preemption_sync_point(step)`, a local check every step, then turns True on
  every process at the same step (the largest step any process had reached, plus one).
  Python must not take SIGTERM from it, so SIGINT is forwarded to it as a SIGTERM. Without
  the sync manager (jax_enable_preemption_service=False) the processes all-gather their
  flags at every step instead (a host sync per step: slower, but still agreed).
  """

  def __init__(self, start: int):
    self.signal_name: str | None = None
    self._previous = {}
    self._mode = "local"
    if jax.process_count() > 1:
      self._mode = "jax" if _preemption_sync_available(start) else "allgather"

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._mode == "jax" else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    if self._mode == "jax":
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler owns SIGTERM: let it spread the notice

  def reached(self, step: int) -> bool:
    """Stop after `step`? The same answer on every process."""
    if self._mode == "local":
      return self.signal_name is not None
    if self._mode == "jax":
      return multihost_utils.reached_preemption_sync_point(step)
    flags = multihost_utils.process_allgather(np.asarray([self.signal_name is not None], np.int32))
    return bool(np.any(flags))

  def describe(self) -> str:
    if self._mode == "local":
      return str(self.signal_name)
    return (f"stop agreed by all {jax.process_count()} processes (SIGTERM or SIGINT on "
            f"{'this one' if self.signal_name else 'one of them'})")

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _preemption_sync_available(step: int) -> bool:
  """Whether jax.distributed started its preemption sync manager (it raises RuntimeError if not)."""
  try:
    multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:
    return False
  return True


def compile_step(task: Task, mesh: jax.sharding.Mesh):
  """The task's step jitted over `mesh`: state replicated and donated, batch split on the data axis.

  The loop and the benchmarks both time this one program. Tasks with equal steps (an experiment's
  seeds and arms) get the same jitted function (`parallel.shared_jit`), so later runs skip tracing and
  compiling it again.
  """
  replicated, batched = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return parallel.shared_jit(task.step, in_shardings=(replicated, batched), out_shardings=(replicated, replicated),
                             donate_argnums=0)


# The init program runs once, yet XLA:CPU spent as long compiling it (~8 s for the demo's G or FPN:
# a random draw per parameter) as the train step; LLVM -O1 compiles it in half the time and gives
# the same parameters bit for bit (tests/test_loop.py; benchmarks/RESULTS.md).
INIT_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _jitted_init(task: Task, mesh: jax.sharding.Mesh):
  options = INIT_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return parallel.shared_jit(task.init, out_shardings=parallel.replicated(mesh), compiler_options=options)


def init_state(task: Task, mesh: jax.sharding.Mesh, seed: int) -> TrainState:
  """A fresh state, born replicated on `mesh`."""
  return _jitted_init(task, mesh)(jax.random.key(seed))


def init_while_step_compiles(task: Task, mesh: jax.sharding.Mesh, seed: int, step_fn, batch) -> TrainState:
  """init_state and task.warm_up, while another thread compiles `step_fn` for `batch`.

  XLA compiles outside the GIL and keeps about one and a half of a 2-core CPU busy per program, so
  the init program's compile and run, and the preview's or evaluator's compile, hide inside the
  step's compile instead of adding to it (benchmarks/run_start.py). Each jitted function keeps its
  executable: the loop's first calls run them without compiling again.
  """
  args = abstract_state(task, mesh, seed), checkpoint.abstract_like(batch)  # traces init once, for both

  def compile_the_step():
    with jax.set_mesh(mesh):  # as the loop calls it: the same program
      step_fn.lower(*args).compile()

  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{task.name}_compile") as pool:
    compiled = pool.submit(compile_the_step)
    state = init_state(task, mesh, seed)
    if task.warm_up is not None:
      with jax.set_mesh(mesh):
        task.warm_up(args[0])
    compiled.result()  # re-raises the step's error, if any
  return state


def abstract_state(task: Task, mesh: jax.sharding.Mesh, seed: int):
  """Shapes, dtypes and shardings of the task's state, without computing it (for restoring)."""
  return checkpoint.abstract_like(_jitted_init(task, mesh).eval_shape(jax.random.key(seed)), parallel.replicated(mesh))


# The remedy when a finished run was trained under other settings (experiment stages check this first).
OTHER_SETTINGS_REMEDY = "use another --workdir, or delete that folder to redo the stage with this config"


def is_trained(workdir, run: str, num_steps: int, shaping: Callable[[], dict]) -> bool:
  """Whether run `run` reached `num_steps` under these shaping settings; a run recorded under others is
  refused (identity.SettingsMismatchError). `shaping` is called only once the run has a checkpoint."""
  directory = layout.checkpoint_dir(workdir, run)
  step = checkpoint.latest_step(directory)
  if step is None:
    return False
  recorded = identity.read_existing(directory, f"checkpoints of run {run!r}")
  identity.compare(directory, recorded["shaping"], shaping(), f"run {run!r}", OTHER_SETTINGS_REMEDY)
  return step >= num_steps


def train(task: Task, t, workdir, *, seed: int, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Run (or resume) `task` to `t.num_steps`; returns the final state.

  `t` is a train config section: batch_size (global), num_steps, log_every,
  checkpoint_every, keep_checkpoints, sample_every. `mesh` defaults to all devices.
  """
  mesh = mesh or parallel.make_mesh()
  parallel.per_process_batch_size(t.batch_size, "train.batch_size", mesh)
  is_writer = jax.process_index() == 0

  ckpt_dir = layout.checkpoint_dir(workdir, task.name)
  # Inputs first (e.g. records of another num_classes are refused here): a run refused for its
  # inputs must not leave a config.json that would then refuse the corrected command.
  batches = task.make_batches()
  if task.shaping is not None:
    identity.ensure(ckpt_dir, task.config, task.shaping(), f"run {task.name!r}",
                    f"train under another --workdir, or delete {ckpt_dir} to retrain", write=is_writer)
  mngr = checkpoint.manager(ckpt_dir, max_to_keep=t.keep_checkpoints)
  resumed_from = None
  if mngr.latest_step() is not None:  # restore into shapes only: no init to compile or run
    # Verified on restore (infra/checkpoint.py): a damaged step stops here, or is skipped with
    # --allow_checkpoint_fallback; state.step is the step really restored.
    state, _ = checkpoint.restore(mngr, abstract_state(task, mesh, seed), data_iter=batches)
    resumed_from = int(state.step)
    if resumed_from < mngr.latest_step():  # newer steps were skipped as damaged: keep them, out of the way
      parallel.barrier(f"{task.name}_restored")  # every process has finished reading them
      if is_writer:
        for moved in checkpoint.set_aside(mngr, resumed_from):
          logging.warning("%s: moved the damaged checkpoint aside to %s", task.name, moved)
      parallel.barrier(f"{task.name}_set_aside")
      mngr.reload()
    logging.info("%s: resumed from step %d (%s)", task.name, resumed_from, ckpt_dir)
  step_fn = compile_step(task, mesh)
  first_batch = None  # a fresh run reads its first batch early, to compile the step while init runs
  if resumed_from is None:
    first_batch = parallel.to_global(next(batches), mesh)
    state = init_while_step_compiles(task, mesh, seed, step_fn, first_batch)

  start = int(state.step)
  # Logs past the restored step belong to a run that died before its next checkpoint: drop them.
  writer = MetricWriter(layout.metrics_dir(workdir), task.name, enabled=is_writer, resume_step=start)
  bar = tqdm(total=t.num_steps, initial=start, desc=task.name, unit="step", disable=not is_writer,
             dynamic_ncols=True, mininterval=2.0)
  try:
    with jax.set_mesh(mesh), _StopRequest(start) as stop:
      for step in range(start + 1, t.num_steps + 1):
        batch = first_batch if first_batch is not None else parallel.to_global(next(batches), mesh)
        first_batch = None
        state, metrics = step_fn(state, batch)
        bar.update(1)
        stopping = stop.reached(step)
        last = step == t.num_steps or stopping
        save = last or step % t.checkpoint_every == 0
        if save or step % t.log_every == 0:  # fetch only here: the step stays asynchronous
          values = parallel.to_host(metrics)
          if not all(math.isfinite(float(v)) for v in values.values()):
            newest = mngr.latest_step()
            raise NonFiniteLossError(
                f"{task.name}: non-finite metrics at step {step}: {values}; stopped without saving. "
                f"This run {'started fresh' if resumed_from is None else f'resumed from step {resumed_from}'}; "
                + (f"its newest checkpoint is step {newest} in {ckpt_dir} (verified when a re-run resumes from it). "
                   if newest is not None else "no checkpoint was saved. ")
                + "Lower train.lr or raise train.warmup_steps, then re-run.")
          writer.scalars(step, values)
          bar.set_postfix(loss=f"{float(values['loss']):.4f}", refresh=False)
        if task.evaluate is not None and task.eval_every and step % task.eval_every == 0:
          # Before the save: a run killed while evaluating resumes from an earlier step and logs this one again.
          scores = task.evaluate(state)
          logging.info("%s: step %d: %s", task.name, step, {k: round(float(v), 4) for k, v in scores.items()})
          writer.scalars(step, scores)
        if save:
          checkpoint.save(mngr, step, state, batches, {"step": step, "task": task.name})
        if task.preview is not None and t.sample_every and (step % t.sample_every == 0 or last):
          task.preview(state, step)
        if stopping:
          mngr.wait_until_finished()
          raise TrainingInterrupted(
              f"{task.name}: {stop.describe()} at step {step}; checkpoint saved in {ckpt_dir}. "
              f"Re-run the same command to resume.")
  finally:
    bar.close()
    writer.close()
    mngr.wait_until_finished()
  return state
