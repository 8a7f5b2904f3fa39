"""orbax checkpoints: one manager per model under <workdir>/checkpoints/<model>/.

A step holds the TrainState, the grain iterator position (so a resumed run continues at
the same batch) and a small JSON of metadata. orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never looks finished.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from satsynth_jax.errors import SatSynthError


class CheckpointNotFoundError(SatSynthError, FileNotFoundError):
  """No (or no such) checkpoint; the message names the directory and what exists."""


def checkpoint_dir(workdir: str, model: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", model)


def manager(directory: str, max_to_keep: int | None = 3, create: bool = True) -> ocp.CheckpointManager:
  """create=False for readers (sampling, evaluation): a missing folder is not made."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(directory, options=options)


def latest_step(directory: str) -> int | None:
  """The newest finished step in `directory`, None when there is none (or no folder)."""
  return manager(directory, create=False).latest_step() if os.path.isdir(directory) else None


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter=None, meta: dict | None = None) -> None:
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def _abstract(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
  """`step` if saved, the latest for None or -1; a clear error otherwise."""
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointNotFoundError(f"no checkpoint in {mngr.directory}: train that model first")
  if step is None or step < 0:
    return max(steps)
  if step not in steps:
    raise CheckpointNotFoundError(f"checkpoint step {step} not in {mngr.directory}; saved steps: {sorted(steps)}")
  return step


def restore(mngr: ocp.CheckpointManager, state_like, step: int | None = None, data_iter=None):
  """Restore (state, meta) at `step` (latest if None) into the shapes and shardings of `state_like`.

  `state_like` may be a real state or `jax.eval_shape` output with shardings attached. The
  iterator, when given, is restored in place.
  """
  step = resolve_step(mngr, step)
  items = {"state": ocp.args.StandardRestore(_abstract(state_like)), "meta": ocp.args.JsonRestore()}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"]


def restore_for_inference(workdir: str, model: str, init_fn, mesh, step: int | None = None):
  """(TrainState replicated on `mesh`, step) of checkpoints/<model>/ at `step` (latest if None/-1).

  `init_fn(rng) -> TrainState` only supplies shapes (jax.eval_shape); nothing is initialised.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(init_fn, jax.random.key(0)))
  mngr = manager(checkpoint_dir(workdir, model), create=False)
  step = resolve_step(mngr, step)
  state, _ = restore(mngr, abstract, step)
  return state, step
