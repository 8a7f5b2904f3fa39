"""Shared pieces of the JAX-vs-PyTorch benchmarks: machine, thread count, timing, FLOPs, peaks, tables.

Both frameworks are timed the same way (`time_interleaved`): untimed warm-up calls first,
then rounds that call each side once, each call ending only when its results are ready
(JAX's `block_until_ready`, `torch.cuda.synchronize` on a GPU); each side's best call is
reported. JAX programs are compiled ahead of time (`compile_jax`), so compilation is
measured on its own and never lands in a timed call.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp

from satsynth_jax.infra import parallel

# Dense peak TFLOP/s per device by `device_kind` substring (first match wins): (bfloat16, float32).
# float32 figures are the rates XLA's default precision runs at: TF32 tensor cores on NVIDIA
# GPUs, single-pass bfloat16 MXU passes on TPUs.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 495.0),
    ("H200", 989.0, 495.0),
    ("A100", 312.0, 156.0),
    ("TPU v6 lite", 918.0, 918.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v4", 275.0, 275.0),
)
CPU_MATMUL_SIZE = 2048
CPU_MATMUL_REPEATS = 10
T = TypeVar("T")

Call = Callable[[], None]  # one timed unit of work; returns only when its results are ready


@dataclasses.dataclass
class Program:
  """A compiled JAX program wrapped as a timed call."""

  call: Call
  compile_seconds: float  # lowering + compilation, kept out of the timing


@dataclasses.dataclass
class TaskSetup:
  """A model's train step exactly as the training loop builds it (loop.init_state, loop.compile_step)."""

  mesh: jax.sharding.Mesh
  batched: jax.sharding.NamedSharding
  state: object
  step: Callable  # the loop's jitted step


def task_setup(task, batch: int, seed: int) -> TaskSetup:
  """A mesh over all devices (batch must split over it), the task's state born on it and its jitted step."""
  from satsynth_jax.train import loop  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  parallel.per_process_batch_size(batch, "--batch", mesh)
  return TaskSetup(mesh, parallel.batch_sharding(mesh), loop.init_state(task, mesh, seed), loop.compile_step(task, mesh))


def parse_overrides(items: Sequence[str]) -> dict:
  """--set KEY=VALUE items as {key: value}; a value is a Python literal when it parses as one, else a string."""
  overrides = {}
  for item in items:
    key, value = item.split("=", 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


def overridden(config, values: dict):
  """`config` with dotted overrides applied, e.g. {"data.image_size": 16}."""
  config.update_from_flattened_dict(dict(values))
  return config


def cpu_model() -> str:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def host_threads() -> int:
  """CPUs this process may run on (its affinity mask): the size of XLA's CPU thread pool
  ("tf_XLAEigen" threads), and what torch is given."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_torch():
  """(torch, device): torch with as many intra-op threads as XLA uses, on the GPU if there is one."""
  import torch  # pylint: disable=g-import-not-at-top  (an optional dependency: the `bench` extra)

  torch.set_num_threads(host_threads())
  allow_torchvision_without_ops(torch)
  return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def allow_torchvision_without_ops(torch) -> None:
  """Lets `import torchvision` succeed when its C++ ops cannot load (e.g. PyPI's CUDA torchvision
  beside a CPU-only torch, where no CPU torchvision build is reachable).

  torchvision registers fake kernels for `nms`/`qnms` unconditionally, so without its ops
  library the import raises. Declaring the two schemas is enough for the Python package; the
  benchmarks' peers (timm's ResNet-50, smp's FPN) never call a torchvision op.
  """
  import sys  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
    return
  except ImportError:
    return  # not installed: smp fails with a clear message of its own
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]  # the half-imported package
  global _TORCHVISION_SCHEMAS  # the Library must outlive this call, or its definitions go
  _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")
  for op in ("nms", "qnms"):
    _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  import torchvision  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name


_TORCHVISION_SCHEMAS = None


def machine_lines(torch=None, device=None) -> list[str]:
  """Markdown bullet lines naming the machine and the backends."""
  dev = jax.devices()[0]
  lines = [
      f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, {host_threads()} usable",
      f"- JAX {jax.__version__}: backend {jax.default_backend()}, {jax.device_count()} x {dev.device_kind}",
  ]
  if torch is not None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines.append(f"- torch {torch.__version__} on {where}, {torch.get_num_threads()} intra-op threads "
                 f"(= XLA's CPU threads)")
  return lines


def load_average() -> str:
  """The 1, 5 and 15 minute load averages: how busy the machine was beside the benchmark."""
  return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def compile_jax(jitted, *args) -> tuple[Callable, float]:
  """(compiled program, seconds spent lowering and compiling it for `args`)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled program from XLA's cost analysis (a multiply-add counts 2)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis["flops"])


def time_interleaved(calls: Sequence[Call], iterations: int, warmup: int = 1) -> list[float]:
  """Best seconds of one call of each of `calls`, timed in turn: a, b, a, b, ...

  Each call must return only when its work is done (block on its outputs). After
  `warmup` untimed rounds, each round times every call once; interleaving exposes all
  sides to the same load from other jobs, and each side's best call is kept because such
  load only ever adds time (as `timeit` advises).
  """
  for _ in range(warmup):
    for call in calls:
      call()
  best = [float("inf")] * len(calls)
  for _ in range(iterations):
    for i, call in enumerate(calls):
      start = time.perf_counter()
      call()
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def peak_flops(dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from) for `dtype` compute.

  Accelerators: `override_tflops` if given, else the datasheet's dense figure from
  PEAK_TFLOPS. CPU: measured, the best of CPU_MATMUL_REPEATS jitted square matmuls of
  CPU_MATMUL_SIZE in `dtype` on all of XLA's threads: what this machine's BLAS-class
  code reaches.
  """
  if override_tflops > 0:
    return override_tflops * 1e12, "--peak_tflops"
  kind = jax.devices()[0].device_kind
  if jax.default_backend() == "cpu":
    n = CPU_MATMUL_SIZE
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(CPU_MATMUL_REPEATS):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, (f"measured: best of {CPU_MATMUL_REPEATS} {n}x{n} {dtype} jnp.dot "
                             f"on {host_threads()} threads")
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in kind:
      return (bf16 if dtype == "bfloat16" else f32) * 1e12, f"datasheet dense {dtype} figure for {name}"
  raise ValueError(f"no known peak FLOP/s for device kind {kind!r}; pass --peak_tflops")


def peak_flops_around(run: Callable[[], T], dtype: str, override_tflops: float = 0.0) -> tuple[T, float, str]:
  """(run(), peak FLOP/s, its source): `peak_flops` taken before and after `run`, the higher kept.

  On a shared CPU other jobs can depress either measurement; a datasheet figure is the same twice.
  """
  before = peak_flops(dtype, override_tflops)
  result = run()
  after = peak_flops(dtype, override_tflops)
  peak, source = max(before, after)
  if jax.default_backend() == "cpu" and override_tflops <= 0:
    source += ", the higher of two runs before and after the benchmark"
  return result, peak, source


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
  """A figure with `digits` significant digits; '-' for a missing one."""
  if value is None:
    return "-"
  return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


# Benchmarks that need a fresh process per setting (XLA reads XLA_FLAGS once per process) run
# themselves as workers, which print one line: WORKER_RESULT + JSON.
WORKER_RESULT = "RESULT "


def print_worker_result(result: dict) -> None:
  print(WORKER_RESULT + json.dumps(result), flush=True)


def run_worker(cmd: Sequence[str], env: dict, what: str, *, cwd=None, timeout: float | None = 1800) -> dict:
  """The worker's JSON result; RuntimeError naming `what`, its exit code and stderr's end when it printed none."""
  done = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  for line in done.stdout.splitlines():
    if line.startswith(WORKER_RESULT):
      return json.loads(line[len(WORKER_RESULT):])
  raise RuntimeError(f"worker failed ({what}, rc {done.returncode}): {done.stderr[-2000:]}")
