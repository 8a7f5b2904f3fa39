"""One XLA CPU device per host against one per core: the demo's train steps as the CLI runs them.

Run from the repository root (nothing else running: the question is how well each layout uses
every core):

  python -m benchmarks.host_devices --rounds=2

XLA reads XLA_FLAGS once per process, so each (device count, round) runs in its own subprocess,
the counts alternating within each round; all of them use the CLI's convolution flag
(infra/host_devices.py). Each worker builds the demo's tasks exactly as the training loop does
(train/diffusion.make_task, train/segmentation.make_task on a prepared demo workdir: the `cpu`
preset's G at batch 16 and ResNet-14 FPN at batch 32, both 32 px), compiles the step through
loop.compile_step, and times it twice: on one fixed batch (the step alone) and fed by the run's own
grain pipeline (what a run pays per step). A variant `N-nocache` turns the pipeline's decoded-pair
cache off (pipeline.DECODED_CACHE_BYTES = 0: every read decodes its PNGs again).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from satsynth_jax.infra import host_devices

def _time(task, mesh, steps: int) -> tuple[float, float]:
  """(ms per step on one fixed batch, ms per step fed by the pipeline), after one warm-up step."""
  import jax  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from satsynth_jax.train import loop  # pylint: disable=g-import-not-at-top
  state = loop.init_state(task, mesh, 0)
  step = loop.compile_step(task, mesh)
  batches = task.make_batches()
  fixed = parallel.to_global(next(batches), mesh)
  with jax.set_mesh(mesh):
    state, metrics = step(state, fixed)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, fixed)
    jax.block_until_ready(metrics)
    alone = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, parallel.to_global(next(batches), mesh))
    jax.block_until_ready(metrics)
    fed = (time.perf_counter() - start) / steps
  return 1e3 * alone, 1e3 * fed


def worker(workdir: str, g_steps: int, seg_steps: int, cache: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from satsynth_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from satsynth_jax import resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from satsynth_jax.train import diffusion, segmentation  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  if not cache:
    pipeline.DECODED_CACHE_BYTES = 0
  config, mesh = demo.get_config(), parallel.make_mesh()
  run = resolved.SegmenterRun.arm(config, 0, 0, None)
  return {"devices": jax.device_count(),
          "g": _time(diffusion.make_task(config, workdir, mesh), mesh, g_steps),
          "fpn": _time(segmentation.make_task(config, workdir, mesh, run), mesh, seg_steps)}


def run(variant: str, workdir: str, g_steps: int, seg_steps: int) -> dict:
  devices, _, cache = variant.partition("-")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={int(devices)}", JAX_PLATFORMS="cpu")
  host_devices.configure(env)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  return common.run_worker([sys.executable, "-m", "benchmarks.host_devices", "--worker", workdir,
                            f"--g_steps={g_steps}", f"--seg_steps={seg_steps}"] + (["--nocache"] if cache else []),
                           env, variant)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--variants", default="1,2,1-nocache", help="CPU device counts; N-nocache: no decoded cache")
  parser.add_argument("--g_steps", type=int, default=20)
  parser.add_argument("--seg_steps", type=int, default=100)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--nocache", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    common.print_worker_result(worker(args.worker, args.g_steps, args.seg_steps, not args.nocache))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  from satsynth_jax.jobs import prepare  # pylint: disable=g-import-not-at-top
  load = common.load_average()
  counts = args.variants.split(",")
  results = {n: [] for n in counts}
  with tempfile.TemporaryDirectory() as workdir:
    prepare.run(demo.get_config(), workdir)
    for r in range(args.rounds):
      for n in counts:
        results[n].append(run(n, workdir, args.g_steps, args.seg_steps))
        print(f"round {r + 1}, {n}: {results[n][-1]}", file=sys.stderr, flush=True)
  base = counts[0]
  rows = []
  for model, label in (("g", "demo G train step (batch 16)"), ("fpn", "demo FPN train step (batch 32)")):
    fed_base = statistics.mean(r[model][1] for r in results[base])
    for n in counts:
      alone = [r[model][0] for r in results[n]]
      fed = [r[model][1] for r in results[n]]
      rows.append([label, n, " / ".join(f"{x:.1f}" for x in alone), " / ".join(f"{x:.1f}" for x in fed),
                   f"{statistics.mean(fed) / fed_base:.2f}"])
  print(f"- {common.cpu_model()}, {len(os.sched_getaffinity(0))} cores; load average {load} at the start, "
        f"{common.load_average()} at the end\n")
  print(common.markdown_table(["program", "CPU devices", "step alone, ms (per round)",
                               "step fed by its pipeline, ms (per round)", f"fed / {base}"], rows))


if __name__ == "__main__":
  main()
