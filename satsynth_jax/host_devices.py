"""Split a CPU host into several XLA devices, so data-parallel steps use every core.

XLA's CPU backend runs one program on one device with a thread pool that keeps about 1.3 of
2 cores busy on our small convolutions; two devices each running half the batch keep both
busy (benchmarks/RESULTS.md, "CPU host devices": train step 1.6x, DDIM sampling 2x on 2 cores).
The flag only shapes the CPU platform, so it is harmless where an accelerator is the backend.
"""

from __future__ import annotations

import os

FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8


def batch_sizes(config) -> tuple[int, ...]:
  """Every global batch that must split over the devices (config_check.validate_devices checks them)."""
  return (config.diffusion.train.batch_size, config.sr.train.batch_size, config.sample.batch_size,
          config.segmentation.train.batch_size, config.segmentation.eval_batch_size)


def choose(cores: int, batches: tuple[int, ...]) -> int:
  """The largest power of two up to `cores` (and MAX_DEVICES) that divides every batch."""
  count = 1
  while count * 2 <= min(cores, MAX_DEVICES) and all(b % (count * 2) == 0 for b in batches):
    count *= 2
  return count


def configure(config, environ=os.environ) -> int | None:
  """Set XLA_FLAGS for this process before JAX starts its backends; returns the count set.

  Leaves the environment alone (returns None) when XLA_FLAGS already sets a count or
  JAX_PLATFORMS names an accelerator, so users and multi-process launches stay in control.
  """
  flags = environ.get("XLA_FLAGS", "")
  platforms = environ.get("JAX_PLATFORMS", "")
  if FLAG in flags or (platforms and "cpu" not in platforms.split(",")):
    return None
  count = choose(len(os.sched_getaffinity(0)), batch_sizes(config))
  environ["XLA_FLAGS"] = f"{flags} {FLAG}={count}".strip()
  return count
