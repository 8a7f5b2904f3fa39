"""XLA:CPU settings the CLI makes before JAX starts: convolutions off YNNPACK, one device per host.

Convolutions: from jaxlib 0.10 XLA:CPU hands convolutions to YNNPACK, whose filter gradient runs
3 to 10x slower than its forward pass; XLA's own convolutions cost about the forward's
(benchmarks/RESULTS.md, "XLA:CPU flags"). CONV_FLAG keeps YNNPACK for dots and elementwise work only.

Devices: with XLA's own convolutions one CPU device keeps every core busy through its thread pool,
and splitting a host into one device per core is slower (2 cores, the demo's steps fed by their
pipelines: two devices take G 1.17x and the segmenter 1.56x as long; benchmarks/host_devices.py,
RESULTS.md "one CPU device"). So the CLI leaves JAX's default of one CPU device; a device count
in XLA_FLAGS (--xla_force_host_platform_device_count, as the tests set) is the user's and is kept.

The flag only shapes the CPU platform, so it is harmless where an accelerator is the backend; a
setting already in XLA_FLAGS is kept.
"""

from __future__ import annotations

import importlib.metadata
import os

CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib 0.8 lacks the flag, and XLA aborts on an unknown one; 0.10.0 and 0.10.2 were checked.
CONV_FLAG_SINCE = (0, 10)


def jaxlib_version() -> tuple[int, ...]:
  release = importlib.metadata.version("jaxlib").split("+")[0].split(".")
  return tuple(int(part) for part in release[:2] if part.isdigit())


def configure(environ=os.environ) -> None:
  """Add CONV_FLAG to XLA_FLAGS for this process before JAX starts its backends.

  Leaves the environment alone when JAX_PLATFORMS names only accelerators, when XLA_FLAGS already
  sets YNNPACK's fusion types, or when the installed jaxlib predates the flag.
  """
  flags = environ.get("XLA_FLAGS", "")
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return
  if CONV_FLAG.split("=")[0] not in flags and jaxlib_version() >= CONV_FLAG_SINCE:
    environ["XLA_FLAGS"] = f"{flags} {CONV_FLAG}".strip()
