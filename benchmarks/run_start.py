"""A training run's start on 2 cores: init and step compiled one after the other, or side by side.

Run from the repository root (each variant in its own cold subprocess, no persistent compilation
cache, the two variants alternating within each round):

  python -m benchmarks.run_start --rounds=2

XLA:CPU compiles a program on one core. `loop.train` used to compile and run the init program
and then compile the step; `loop.init_while_step_compiles` compiles the step on a second thread
meanwhile. Measured: seconds from building the demo's task to its first step done, for G
(32 px, batch 16) and the FPN segmenter (ResNet-14, 32 px, batch 32), and that step's outputs
(equal in both variants: it is one program).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

VARIANTS = ("one after the other", "side by side")


def worker(variant: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import segmentation  # pylint: disable=g-import-not-at-top
  from satsynth_jax import generator, resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from satsynth_jax.train import diffusion, loop, segmentation as seg_train  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  mesh, config, out = parallel.make_mesh(), demo.get_config(), {}
  rng = np.random.default_rng(0)
  size = config.data.image_size
  g_batch = {"x": rng.uniform(-1, 1, (16, size, size, generator.joint_channels(config))).astype(np.float32)}
  images, masks = segmentation.random_batch(32, size, config.data.num_classes)
  fpn_batch = {"image": images, "mask": masks, "is_synthetic": np.zeros((32,), bool)}
  config.diffusion.train.sample_every = 0
  tasks = {"g": (diffusion.make_task(config, "unused-workdir", mesh), g_batch),
           "fpn": (seg_train.make_task(config, "unused-workdir", mesh, resolved.SegmenterRun.arm(config, 0, 0, None)),
                   fpn_batch)}
  for name, (task, host_batch) in tasks.items():
    start = time.perf_counter()
    step_fn = loop.compile_step(task, mesh)
    batch = parallel.to_global(host_batch, mesh)
    if variant == VARIANTS[0]:
      state = loop.init_state(task, mesh, config.seed)
    else:
      state = loop.init_while_step_compiles(task, mesh, config.seed, step_fn, batch)
    with jax.set_mesh(mesh):
      state, metrics = step_fn(state, batch)
    loss = float(metrics["loss"])
    out[name] = [time.perf_counter() - start, loss]
  return out


def run(variant: str) -> dict:
  import os  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import host_devices  # pylint: disable=g-import-not-at-top  (imports no jax)
  env = dict(os.environ, XLA_FLAGS=host_devices.CONV_FLAG, JAX_PLATFORMS="cpu")  # the CLI's XLA:CPU settings
  return common.run_worker([sys.executable, "-m", "benchmarks.run_start", "--worker", variant], env, variant)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
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
  for model, label in (("g", "demo G"), ("fpn", "demo FPN")):
    base = statistics.mean(r[model][0] for r in results[VARIANTS[0]])
    for variant in VARIANTS:
      seconds = [r[model][0] for r in results[variant]]
      rows.append([label, variant, " / ".join(f"{s:.1f}" for s in seconds), f"{statistics.mean(seconds) / base:.2f}",
                   " / ".join(f"{r[model][1]:.6f}" for r in results[variant])])
  print(f"- {common.cpu_model()}, {common.host_threads()} cores; load average {load} at the start, "
        f"{common.load_average()} at the end\n")
  print(common.markdown_table(["model", "init and step compile", "s to the first step done (per round)",
                               "/ one after the other", "first step's loss"], rows))


if __name__ == "__main__":
  main()
