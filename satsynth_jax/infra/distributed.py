"""Multi-process start-up on JAX's own runtime: `jax.distributed.initialize` before any job.

One process runs per host (it drives all of that host's accelerators). Settings, first found wins:

  --coordinator_address / SATSYNTH_COORDINATOR     host:port of process 0, reachable from every host
  --num_processes       / SATSYNTH_NUM_PROCESSES   how many processes take part
  --process_id          / SATSYNTH_PROCESS_ID      this process, 0 .. num_processes - 1

`--distributed` chooses when to initialise:
  auto  explicit settings given, or a multi-host TPU environment (TPU_WORKER_HOSTNAMES or
        TPU_PROCESS_ADDRESSES listing several hosts, MEGASCALE_COORDINATOR_ADDRESS); otherwise
        a single-process run, as on one GPU or a laptop.
  on    always: explicit settings, else JAX's cluster detection (Cloud TPU VM metadata, SLURM,
        Open MPI, Kubernetes), the way to start every worker of a TPU pod slice.
  off   never.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
from absl import logging

from satsynth_jax.infra.errors import SatSynthError

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "SATSYNTH_COORDINATOR"
ENV_NUM_PROCESSES = "SATSYNTH_NUM_PROCESSES"
ENV_PROCESS_ID = "SATSYNTH_PROCESS_ID"
# Environment variables through which TPU runtimes announce a multi-host slice.
_TPU_HOST_LISTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_TPU_MULTISLICE = "MEGASCALE_COORDINATOR_ADDRESS"


class DistributedConfigError(SatSynthError, ValueError):
  """Incomplete or inconsistent multi-process settings; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Arguments for jax.distributed.initialize; all None means "let JAX detect the cluster"."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _integer(value: int | str | None, flag: str, env: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(f"{flag} (or {env}) must be an integer, got {value!r}") from None


def _tpu_multi_host(environ: Mapping[str, str]) -> bool:
  hosts = (environ.get(name, "") for name in _TPU_HOST_LISTS)
  return any(len([h for h in value.split(",") if h.strip()]) > 1 for value in hosts) or bool(
      environ.get(_TPU_MULTISLICE))


def resolve(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None, environ: Mapping[str, str] | None = None) -> Settings | None:
  """The settings to initialise with, or None for a single-process run. Flags beat environment."""
  if mode not in MODES:
    raise DistributedConfigError(f"--distributed={mode!r}: must be one of {', '.join(MODES)}")
  environ = os.environ if environ is None else environ
  if mode == "off":
    return None
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = _integer(num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
                   "--num_processes", ENV_NUM_PROCESSES)
  index = _integer(process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
                   "--process_id", ENV_PROCESS_ID)
  given = {"--coordinator_address": (address, ENV_COORDINATOR), "--num_processes": (count, ENV_NUM_PROCESSES),
           "--process_id": (index, ENV_PROCESS_ID)}
  if all(value is None for value, _ in given.values()):
    return Settings() if mode == "on" or _tpu_multi_host(environ) else None
  if missing := [f"{flag} (or {env})" for flag, (value, env) in given.items() if value is None]:
    present = ", ".join(flag for flag, (value, _) in given.items() if value is not None)
    raise DistributedConfigError(f"{' and '.join(missing)} must be set too: a multi-process run given {present} "
                                 f"needs the coordinator address, the process count and this process's id")
  if count < 1:
    raise DistributedConfigError(f"--num_processes (or {ENV_NUM_PROCESSES}) must be >= 1, got {count}")
  if not 0 <= index < count:
    raise DistributedConfigError(f"--process_id (or {ENV_PROCESS_ID}) must be in [0, {count}), got {index}")
  if ":" not in address:
    raise DistributedConfigError(f"--coordinator_address (or {ENV_COORDINATOR}) must be host:port, got {address!r}")
  if count == 1 and mode == "auto":
    return None
  return Settings(address, count, index)


def initialize(settings: Settings | None, timeout_s: int = 300) -> None:
  """Joins the run described by `settings` (None: stay single-process). Call before any JAX work."""
  if settings is None or jax.distributed.is_initialized():
    return
  # Cross-process collectives between CPU devices need gloo (the tests' CPU "hosts"); the
  # setting only concerns the CPU backend, so accelerator runs are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                             num_processes=settings.num_processes, process_id=settings.process_id,
                             initialization_timeout=timeout_s)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
