"""orbax checkpoints: one manager per run under <workdir>/checkpoints/<run>/ (workdir.checkpoint_dir).

A step holds four items:
  state      the whole TrainState (optimizer included), for resuming training;
  inference  the variables inference uses, {"params": EMA (or raw) params[, "batch_stats"]},
             so sampling and evaluation restore them alone and never build an optimizer;
  data       the grain iterator position, so a resumed run continues at the same batch;
  meta       a small JSON, with a sha256 digest of the state's and the inference item's leaves.
orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never looks finished.

Restores verify what they read: orbax/tensorstore read errors (truncated or missing files),
a digest that differs from the one saved (altered bytes read back as wrong numbers without
any error) and non-finite floats (NaN or +-inf, in the state and in the inference weights) all
raise CheckpointDamagedError naming the step. Before any array is read, the step's array
shapes and dtypes (orbax metadata) are compared with the model's: a run trained with other
settings raises CheckpointSettingsError naming the arrays and both shapes, never "damaged". With
`configure(allow_fallback=True)` (main.py's --allow_checkpoint_fallback) a restore of the
latest step instead falls back to the newest earlier step that verifies, logging each
skipped step.
"""

from __future__ import annotations

import functools
import hashlib
import logging as logging_std
import os
import re
import sys
import time
import traceback

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from satsynth_jax.infra import parallel
from satsynth_jax.infra.errors import SatSynthError

DIGEST_KEY = "sha256"  # meta[DIGEST_KEY] = {"state": hex, "inference": hex}
_settings = {"allow_fallback": False}


class CheckpointNotFoundError(SatSynthError, FileNotFoundError):
  """No (or no such) checkpoint; the message names the directory and what exists."""


class CheckpointDamagedError(SatSynthError, ValueError):
  """A checkpoint step that cannot be read or does not verify; the message names it and the way out."""


class CheckpointSettingsError(SatSynthError, ValueError):
  """A checkpoint whose arrays differ in shape or dtype from the model the settings build: a run made
  with other settings, not damage; the message names the arrays and both shapes."""


def configure(*, allow_fallback: bool) -> None:
  """Set once by main.py: may restores of the latest step fall back to an earlier one that verifies?"""
  _settings["allow_fallback"] = bool(allow_fallback)


@functools.cache  # registers once per process
def _save_replicas_whole_on_cpu() -> None:
  """On CPU, save each replicated array from one replica instead of splitting it across replicas.

  orbax's replica-parallel saving (its default off GPU) slices every replicated array into one
  part per replica, and each distinct slice is a new XLA program: on the 4 host devices of a CPU
  run that is ~0.03 s of compiling per array (~4 s for the segmenter's first save) to divide a
  copy within one host's memory. (orbax itself turns it off on GPU.)
  """
  if jax.default_backend() == "cpu":
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that the override it was asked for overrides
    try:
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                              override=True)
    finally:
      logging.set_verbosity(verbosity)


def manager(directory: str | os.PathLike, max_to_keep: int | None = 3, create: bool = True) -> ocp.CheckpointManager:
  """create=False for readers (sampling, evaluation): a missing folder is not made."""
  _save_replicas_whole_on_cpu()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(os.fspath(directory), options=options)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest finished step in `directory`, None when there is none (or no folder)."""
  return manager(directory, create=False).latest_step() if os.path.isdir(directory) else None


def abstract_like(tree, sharding: jax.sharding.Sharding | None = None):
  """ShapeDtypeStructs of `tree` (arrays or eval_shape output), placed with `sharding` when given."""

  def struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else
                                getattr(x, "sharding", None))

  return jax.tree.map(struct, tree)


def inference_variables(state) -> dict:
  """What inference needs of a TrainState: EMA (or raw) params, plus BatchNorm statistics if any."""
  variables = {"params": state.eval_params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def _host(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.ascontiguousarray(parallel.to_host(leaf))


def digest(tree) -> tuple[str, list[str]]:
  """(sha256 over every leaf's name, dtype, shape and bytes; names of leaves holding NaN/inf).

  Names use key names only ("params/Conv_0/kernel"), so a dict saved and a dict restored hash
  alike whatever their container types. Needs a host copy: called at checkpoint cadence.
  """
  h = hashlib.sha256()
  nonfinite = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    x = _host(leaf)
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    h.update(f"{name}|{x.dtype.name}|{x.shape}|".encode())
    h.update(x.tobytes())
    if jax.dtypes.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
      nonfinite.append(name)
  return h.hexdigest(), nonfinite


def weights_id(name: str, variables, step: int) -> str:
  """"<name>@<step>:<first 12 hex digits of digest(variables)>": which weights made a score (the metric
  encoder's, curation's scorer's), the same digest the checkpoint records for its inference item."""
  return f"{name}@{step}:{digest(variables)[0][:12]}"


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter=None, meta: dict | None = None) -> None:
  variables = inference_variables(state)
  meta = {**(meta or {}), DIGEST_KEY: {"state": digest(state)[0], "inference": digest(variables)[0]}}
  items = {"state": ocp.args.StandardSave(state),
           "inference": ocp.args.StandardSave(variables),
           "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def resolve_step(mngr: ocp.CheckpointManager, step: int | None, hint: str = "train that model first") -> int:
  """`step` if saved, the latest for None or -1; a clear error otherwise."""
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointNotFoundError(f"no checkpoint in {mngr.directory}: {hint}")
  if step is None or step < 0:
    return max(steps)
  if step not in steps:
    raise CheckpointNotFoundError(f"checkpoint step {step} not in {mngr.directory}; saved steps: {sorted(steps)}")
  return step


class _Damaged(Exception):
  """Internal: one step failed to read or verify; `reason` is a short phrase."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _short(error: BaseException) -> str:
  """The innermost cause of a read error in a few words (tensorstore appends whole specs)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split())
  text = re.sub(r" \[tensorstore_spec.*", "", text)
  text = re.sub(r" in OCDBT database at local file \"[^\"]*\"", "", text)
  text = re.sub(r" See full TensorStore details.*", "", text)
  text = text or type(error).__name__
  return text if len(text) <= 160 else text[:157] + "..."


class _AbandonedReads(logging_std.Filter):
  """A failed restore leaves orbax's other reads of that step running: asyncio later logs their
  errors, and tensorstore callbacks into orbax's closed event loop report through
  sys.unraisablehook or (PyErr_Print) sys.excepthook, all with tracebacks. The failure is already
  reported in one line; these echoes are dropped."""

  def __init__(self):
    super().__init__()
    self.paths: set[str] = set()
    self._unraisable = self._excepthook = None

  def filter(self, record) -> bool:
    error = record.exc_info[1] if record.exc_info else record.__dict__.get("exception")
    if "exception was never retrieved" not in str(record.msg) or error is None:
      return True
    return not any(path in str(error) for path in self.paths)

  def is_echo(self, error: BaseException | None, tb) -> bool:
    frames = traceback.extract_tb(tb) if tb else []
    closed_loop = (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                   and frames and frames[-1].filename.endswith(os.path.join("asyncio", "base_events.py")))
    return bool(closed_loop or any(path in str(error) for path in self.paths))  # or an abandoned read

  def unraisable(self, info) -> None:
    if not self.is_echo(info.exc_value, info.exc_traceback):
      self._unraisable(info)

  def excepthook(self, kind, error, tb) -> None:
    if not self.is_echo(error, tb):
      self._excepthook(kind, error, tb)

  def install(self) -> None:
    """Hooks in place before a read starts: a failing read's sibling reads can echo before it raises."""
    if self not in logging_std.getLogger("asyncio").filters:
      logging_std.getLogger("asyncio").addFilter(self)
    # (re)install: a test runner or absl may have replaced them since
    if sys.unraisablehook != self.unraisable:
      self._unraisable, sys.unraisablehook = sys.unraisablehook, self.unraisable
    if sys.excepthook != self.excepthook:
      self._excepthook, sys.excepthook = sys.excepthook, self.excepthook

  def watch(self, step_dir: str) -> None:
    """Also drop errors naming `step_dir`, a step whose read failed."""
    self.install()
    self.paths.add(step_dir)


_abandoned = _AbandonedReads()


def _verify(tree, meta, item: str) -> None:
  actual, nonfinite = digest(tree)
  if nonfinite:
    names = ", ".join(nonfinite[:3]) + (f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else "")
    raise _Damaged(f"non-finite values in {item} {names}")
  expected = (meta or {}).get(DIGEST_KEY, {}).get(item)
  if expected is not None and expected != actual:  # checkpoints from before digests: finite check only
    raise _Damaged(f"{item} sha256 differs from the one recorded at save time: altered bytes")


def _leaf_specs(tree) -> dict[str, str]:
  """{leaf name: "(shape) dtype"} of arrays, ShapeDtypeStructs or orbax array metadata; PRNG keys as the
  key data a checkpoint holds."""
  specs = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    specs[jax.tree_util.keystr(path, simple=True, separator="/")] = f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"
  return specs


def _check_layout(where: str, target) -> None:
  """Refuse, before reading any array, a step whose arrays are not the ones `target` (abstract) expects.

  A model built with other settings (width, depth, optimizer) would otherwise fail inside orbax's
  reads and look like damage. Unreadable metadata is damage (_Damaged).
  """
  try:
    stored = _leaf_specs(ocp.StandardCheckpointHandler().metadata(epath.Path(where)).tree)
  except Exception as e:  # noqa: BLE001  (a missing or garbled _METADATA file: json, KeyError, OSError...)
    raise _Damaged(f"metadata unreadable: {_short(e)}") from e
  expected = _leaf_specs(target)
  absent = "(absent)"
  diffs = [f"{name} {stored.get(name, absent)} saved, {expected.get(name, absent)} expected"
           for name in sorted(stored.keys() | expected.keys()) if stored.get(name) != expected.get(name)]
  if diffs:
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise CheckpointSettingsError(
        f"{os.path.dirname(where)}: not damaged, but saved by a model built with other settings than this "
        f"command's ({'; '.join(diffs[:3])}{more}); use the settings the run was trained with (its "
        f"config.json), or retrain it")


def _read(mngr: ocp.CheckpointManager, step: int, items: dict, item: str):
  """mngr.restore(step) with `item` verified; read errors and failed checks become _Damaged, arrays of
  other shapes than `item`'s target CheckpointSettingsError."""
  _check_layout(os.path.join(os.fspath(mngr.directory), str(step), item), items[item].item)
  _abandoned.install()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # noqa: BLE001  (tensorstore raises bare Exception/ValueError; json, KeyError...)
    _abandoned.watch(os.path.join(os.fspath(mngr.directory), str(step)))
    raise _Damaged(_short(e)) from e
  _verify(restored[item], restored["meta"], item)
  return restored


def _damaged_message(mngr, step: int, reason: str, earlier: list[int], pinned: bool) -> str:
  where = os.path.join(os.fspath(mngr.directory), str(step))
  if pinned:
    return f"{where}: unreadable or damaged ({reason}); choose another saved step ({sorted(mngr.all_steps())})"
  if earlier:
    return (f"{where}: unreadable or damaged ({reason}); re-run with --allow_checkpoint_fallback to use step "
            f"{earlier[0]} (or the newest earlier step that verifies), or delete it")
  return (f"{where}: unreadable or damaged ({reason}); no earlier step to fall back to: delete it to start the "
          f"run afresh")


def _restore_verified(mngr, step: int | None, hint: str, make_items, item: str):
  """(restored items, step): `step` (None/-1: the latest, falling back when allowed) read and verified."""
  pinned = step is not None and step >= 0
  step = resolve_step(mngr, step, hint)
  candidates = [step] if pinned else sorted((s for s in mngr.all_steps() if s <= step), reverse=True)
  for i, candidate in enumerate(candidates):
    try:
      return _read(mngr, candidate, make_items(), item), candidate
    except _Damaged as e:
      earlier = candidates[i + 1:]
      if pinned or not _settings["allow_fallback"] or not earlier:
        if i > 0:  # every step from the latest down failed: name the first and the last tried
          raise CheckpointDamagedError(
              f"{mngr.directory}: no step verifies (tried {candidates[:i + 1]}; step {candidate}: {e.reason}); "
              f"delete the run's folder to start it afresh") from None
        raise CheckpointDamagedError(_damaged_message(mngr, candidate, e.reason, earlier, pinned)) from None
      logging.warning("checkpoint %s/%d skipped: unreadable or damaged (%s); trying step %d "
                      "(--allow_checkpoint_fallback)", mngr.directory, candidate, e.reason, earlier[0])
  raise AssertionError("unreachable")


def restore(mngr: ocp.CheckpointManager, state_like, step: int | None = None, data_iter=None):
  """Restore and verify (state, meta) at `step` (latest if None) into the shapes and shardings of `state_like`.

  `state_like` may be a real state or `abstract_like` output. The iterator, when given, is
  restored in place. The returned state's `step` says which step was restored: with fallback
  allowed it may be older than the latest (see `set_aside`).
  """

  def items():
    out = {"state": ocp.args.StandardRestore(abstract_like(state_like)), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      out["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return out

  restored, _ = _restore_verified(mngr, step, "train that model first", items, "state")
  return restored["state"], restored["meta"]


def set_aside(mngr: ocp.CheckpointManager, after: int) -> list[str]:
  """Rename the steps newer than `after` (ones a fallback skipped) to `<step>.damaged`, so training
  can save those steps again while the damaged files stay for inspection. Process 0 only."""
  moved = []
  for step in sorted(s for s in mngr.all_steps() if s > after):
    source = os.path.join(os.fspath(mngr.directory), str(step))
    target = f"{source}.damaged"
    if os.path.exists(target):
      target = f"{target}-{int(time.time())}"
    os.rename(source, target)
    moved.append(target)
  mngr.reload()
  return moved


def restore_inference(directory: str | os.PathLike, abstract_variables, mesh, step: int | None = None, *,
                      hint: str = "train that model first") -> tuple[dict, int]:
  """(variables replicated on `mesh`, step) of the run in `directory` at `step` (latest if None/-1), verified.

  `abstract_variables` is `jax.eval_shape` of the model's init ({"params"[, "batch_stats"]});
  only the inference item is read, so no optimizer is built. `hint` says how to make the
  checkpoint when there is none. The returned step is the one restored (older than the
  latest after a fallback).
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"no checkpoint in {directory}: {hint}")
  mngr = manager(directory, create=False)
  wanted = {k: v for k, v in abstract_variables.items() if k == "params" or v}

  def items():
    return {"inference": ocp.args.StandardRestore(abstract_like(wanted, replicated)),
            "meta": ocp.args.JsonRestore()}

  restored, step = _restore_verified(mngr, step, hint, items, "inference")
  return dict(restored["inference"]), step
