"""Data parallelism over every device: one mesh axis, batches split on it, state replicated.

`jit` over a `Mesh` is the current successor to `pmap`: one program for all devices and
hosts, with XLA inserting the gradient all-reduce, so the train step stays a plain function.
`shared_jit` hands every run of an experiment the same jitted object for equal programs.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from satsynth_jax.infra.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: the schedule lookup `table[t]` with a batch-sharded `t` needs them (STYLE.md).
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_process_batch_size(global_batch_size: int, what: str = "batch_size", mesh: Mesh | None = None) -> int:
  """Rows each process feeds; the global batch must split evenly over the mesh's devices."""
  devices = mesh.size if mesh is not None else jax.device_count()
  if global_batch_size % devices:
    raise ConfigError(
        f"config.{what}={global_batch_size} is not divisible by the {devices} devices; "
        f"use a multiple of {devices}")
  return global_batch_size // jax.process_count()


def to_global(host_batch, mesh: Mesh):
  """This process's rows (a pytree of NumPy arrays) -> global arrays sharded on the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def to_host(tree):
  """Arrays -> NumPy holding their global value on every process (for logging and writing).

  Replicated (metrics) and single-process arrays are copied from a local device. A batch
  sharded over several processes (e.g. preview samples) is gathered from all of them: that
  is a collective, so every process must call to_host on it, as every process ran the step.
  """

  def fetch(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(fetch, tree)


def barrier(name: str) -> None:
  """Returns once every process has reached the barrier `name`; a no-op with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


_SHARED_JITS: collections.OrderedDict = collections.OrderedDict()
_MAX_SHARED_JITS = 16  # an experiment's distinct train, init and eval steps; each holds its compiled programs
_UNHASHABLE = object()


def shared_jit(fn: Callable, **options):
  """`jax.jit(fn, **options)`, one object for every (fn, options) equal by value (`_by_value`).

  jax caches a jitted function's traces and executables on that function object, while each run
  builds its step afresh (a new functools.partial over an equal model and settings); sharing the
  object turns a later run's tracing, lowering and compile-cache lookup into a cache hit.
  """
  key = _by_value((fn, tuple(sorted(options.items()))))
  if key is _UNHASHABLE:  # e.g. a task closing over weight arrays: jit it afresh
    return jax.jit(fn, **options)
  if key not in _SHARED_JITS:
    _SHARED_JITS[key] = jax.jit(fn, **options)
    while len(_SHARED_JITS) > _MAX_SHARED_JITS:
      _SHARED_JITS.popitem(last=False)
  _SHARED_JITS.move_to_end(key)
  return _SHARED_JITS[key]


def _by_value(obj):
  """A hashable stand-in for `obj` equal for equal values: partials by function and arguments,
  ConfigDicts by content, sequences item by item, other objects by their own hash and ==
  (flax modules compare by fields, functions by identity); _UNHASHABLE when a part has no hash."""
  if isinstance(obj, functools.partial):
    obj = ("partial", obj.func, obj.args, tuple(sorted(obj.keywords.items())))
  if isinstance(obj, dict):
    obj = ("dict", tuple(sorted(obj.items())))
  if isinstance(obj, ml_collections.ConfigDict):
    obj = ("config", obj.to_json_best_effort(sort_keys=True))
  if isinstance(obj, (tuple, list)):
    parts = tuple(_by_value(part) for part in obj)
    return _UNHASHABLE if any(part is _UNHASHABLE for part in parts) else (type(obj).__name__, parts)
  try:
    hash(obj)
  except TypeError:
    return _UNHASHABLE
  return obj
