"""XLA:CPU settings the CLI makes before JAX starts: one device per core, and convolutions off YNNPACK.

Devices: XLA's CPU backend runs one program on one device with a thread pool that keeps about
1.3 of 2 cores busy on our small convolutions; two devices each running half the batch keep both
busy (benchmarks/RESULTS.md, "CPU host devices": train step 1.6x, DDIM sampling 2x on 2 cores).

Convolutions: from jaxlib 0.10 XLA:CPU hands convolutions to YNNPACK, whose filter gradient runs
3 to 10x slower than its forward pass; XLA's own convolutions cost about the forward's
(RESULTS.md, "XLA:CPU flags"). CONV_FLAG keeps YNNPACK for dots and elementwise work only.

Both flags only shape the CPU platform, so they are harmless where an accelerator is the backend;
a setting already in XLA_FLAGS is kept.
"""

from __future__ import annotations

import importlib.metadata
import os

FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8
CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib 0.8 lacks the flag, and XLA aborts on an unknown one; 0.10.0 and 0.10.2 were checked.
CONV_FLAG_SINCE = (0, 10)


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


def jaxlib_version() -> tuple[int, ...]:
  release = importlib.metadata.version("jaxlib").split("+")[0].split(".")
  return tuple(int(part) for part in release[:2] if part.isdigit())


def configure(config, environ=os.environ) -> int | None:
  """Set XLA_FLAGS for this process before JAX starts its backends; returns the device count set.

  Leaves the environment alone when JAX_PLATFORMS names only accelerators. A device count or a
  YNNPACK setting already in XLA_FLAGS is kept (None is returned when the count was), so users
  and multi-process launches stay in control.
  """
  flags = environ.get("XLA_FLAGS", "")
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return None
  count = None
  if CONV_FLAG.split("=")[0] not in flags and jaxlib_version() >= CONV_FLAG_SINCE:
    flags = f"{flags} {CONV_FLAG}"
  if FLAG not in flags:
    count = choose(len(os.sched_getaffinity(0)), batch_sizes(config))
    flags = f"{flags} {FLAG}={count}"
  environ["XLA_FLAGS"] = flags.strip()
  return count
