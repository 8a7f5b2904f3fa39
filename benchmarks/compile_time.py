"""Cold compile time and step time of the demo's train steps under XLA:CPU flag sets.

Run from the repository root (each run pinned to one core, no persistent compilation cache):

  python -m benchmarks.compile_time --rounds=3

Compiling is most of a short CPU run's time (the demo's stages, the test suite), so a flag that
compiles faster at an equal step time is worth making the CPU default (infra/host_devices.py). Each
(flag set, round) runs in its own subprocess, as XLA reads XLA_FLAGS once per process; the sets
alternate within each round. Programs: the training loop's jitted steps of the demo G (32 px, batch
16) and of the demo segmenter (ResNet-14 FPN, 32 px, batch 32), compiled ahead of time, then
stepped 5 times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
FLAG_SETS = (("LLVM -O2 (XLA's default)", CONV), ("LLVM -O1", f"{CONV} --xla_backend_optimization_level=1"),
             ("LLVM -O0", f"{CONV} --xla_backend_optimization_level=0"))


def _compile_and_step(program) -> tuple[float, float]:
  """(compile seconds, mean seconds per step over 5 steps after one warm-up) of a common.Program."""
  program.call()
  start = time.perf_counter()
  for _ in range(5):
    program.call()
  return program.compile_seconds, (time.perf_counter() - start) / 5


def worker() -> dict:
  """The training loop's own jitted steps (benchmarks.diffusion / benchmarks.segmentation), compiled cold."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import diffusion, segmentation  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  g = diffusion.JaxUNet(demo.get_config(), demo.get_config().diffusion.train.batch_size)
  fpn = segmentation.JaxFPN(demo.get_config(), demo.get_config().segmentation.train.batch_size)
  return {"g": _compile_and_step(g.train_program()[0]), "fpn": _compile_and_step(fpn.train_program()[0])}


def run(flags: str) -> dict:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {flags}", JAX_PLATFORMS="cpu")
  return common.run_worker(["taskset", "-c", "0", sys.executable, "-m", "benchmarks.compile_time", "--worker"],
                           env, flags)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    common.print_worker_result(worker())
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  load = common.load_average()
  results = {name: [] for name, _ in FLAG_SETS}
  for r in range(args.rounds):
    for name, flags in FLAG_SETS:
      results[name].append(run(flags))
      print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
  base = FLAG_SETS[0][0]
  rows = []
  for model, label in (("g", "demo G train step"), ("fpn", "demo FPN train step")):
    for name, flags in FLAG_SETS:
      compiles = [r[model][0] for r in results[name]]
      steps = [r[model][1] for r in results[name]]
      ratio = statistics.mean(compiles) / statistics.mean([r[model][0] for r in results[base]])
      rows.append([label, name, " / ".join(f"{x:.1f}" for x in compiles), f"{ratio:.2f}",
                   " / ".join(f"{1e3 * x:.0f}" for x in steps)])
  print(f"- {common.cpu_model()}, one pinned core per run; load average {load} at the start, "
        f"{common.load_average()} at the end\n")
  print(common.markdown_table(["program", "flags", "compile s (per round)", "compile / -O2", "step ms (per round)"],
                              rows))


if __name__ == "__main__":
  main()
