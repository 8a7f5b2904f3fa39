"""A training run's start on 2 cores: its programs compiled one after the other, or side by side.

Run from the repository root (each variant in its own cold subprocess, no persistent compilation
cache, the two variants alternating within each round):

  python -m benchmarks.run_start --rounds=3

XLA:CPU compiles a program on about one and a half cores. A fresh run of the demo compiles its
init, its step, and the program its preview grid (G) or val curve (FPN) will call. "one after the
other" is how the loop ran them before: init, then the step at the first call, then the other
program at its first use. "side by side" is `loop.init_while_step_compiles`: the step compiles on
a second thread while init and `task.warm_up` run. Measured: seconds until all three are compiled
and the first step is done, for the demo's G (32 px, batch 16, with its preview sampler) and FPN
(ResNet-14, 32 px, batch 32, with its val evaluator), on a freshly prepared demo workdir; and the
first step's loss (equal in both variants: the same programs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

VARIANTS = ("one after the other", "side by side")


def worker(variant: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from satsynth_jax import resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from satsynth_jax.jobs import prepare  # pylint: disable=g-import-not-at-top
  from satsynth_jax.train import diffusion, loop, segmentation  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  mesh, config, out = parallel.make_mesh(), demo.get_config(), {}
  with tempfile.TemporaryDirectory() as workdir:
    prepare.run(config, workdir)
    tasks = {"g": diffusion.make_task(config, workdir, mesh),
             "fpn": segmentation.make_task(config, workdir, mesh, resolved.SegmenterRun.arm(config, 0, 0, None))}
    for name, task in tasks.items():
      start = time.perf_counter()
      step_fn = loop.compile_step(task, mesh)
      batch = parallel.to_global(next(task.make_batches()), mesh)
      if variant == VARIANTS[0]:
        state = loop.init_state(task, mesh, config.seed)
        with jax.set_mesh(mesh):
          stepped, metrics = step_fn(state, batch)
          task.warm_up(loop.abstract_state(task, mesh, config.seed))
      else:
        state = loop.init_while_step_compiles(task, mesh, config.seed, step_fn, batch)
        with jax.set_mesh(mesh):
          stepped, metrics = step_fn(state, batch)
      out[name] = [time.perf_counter() - start, float(metrics["loss"])]
  return out


def run(variant: str) -> dict:
  import os  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import host_devices  # pylint: disable=g-import-not-at-top  (imports no jax)
  env = dict(os.environ, XLA_FLAGS=host_devices.CONV_FLAG, JAX_PLATFORMS="cpu")  # the CLI's XLA:CPU settings
  return common.run_worker([sys.executable, "-m", "benchmarks.run_start", "--worker", variant], env, variant)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  if args.worker:
    common.print_worker_result(worker(args.worker))
    return
  load = common.load_average()
  results = {variant: [] for variant in VARIANTS}
  for r in range(args.rounds):
    for variant in VARIANTS:
      results[variant].append(run(variant))
      print(f"round {r + 1} {variant}: {results[variant][-1]}", file=sys.stderr, flush=True)
  rows = []
  for model, label in (("g", "demo G (+ preview sampler)"), ("fpn", "demo FPN (+ val evaluator)")):
    base = statistics.mean(r[model][0] for r in results[VARIANTS[0]])
    for variant in VARIANTS:
      seconds = [r[model][0] for r in results[variant]]
      rows.append([label, variant, " / ".join(f"{s:.1f}" for s in seconds), f"{statistics.mean(seconds) / base:.2f}",
                   " / ".join(f"{r[model][1]:.6f}" for r in results[variant])])
  print(f"- {common.cpu_model()}, {common.host_threads()} cores; load average {load} at the start, "
        f"{common.load_average()} at the end\n")
  print(common.markdown_table(["model", "init, step and first-use compiles", "s until compiled and stepped once "
                               "(per round)", "/ one after the other", "first step's loss"], rows))


if __name__ == "__main__":
  main()
