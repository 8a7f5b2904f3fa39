"""Train steps before and after a change, side by side: two source trees and the PyTorch peer, one core.

Run from the repository root:

  python -m benchmarks.before_after --before=HEAD --models=unet,fpn --rounds=3

`--before` is a git revision, exported with `git archive` into a temporary folder (git's state is not
touched); `--after` is a folder holding a checkout, by default this repository's working tree. For each
model (unet: the demo G at batch 16, 32 px; fpn: FPN-ResNet50 at batch 2, 256 px, as `xla_flags` times
them) every round runs the before step, the after step and the peer (diffusers' UNet2DModel / smp's FPN)
once each, every run a fresh process pinned to one core (`taskset -c 0`) with the CLI's XLA:CPU flags
(host_devices.CONV_FLAG), compiled without a persistent cache. A run times `--steps` calls after one
warm-up and reports its best wall time and its best process CPU time: on a shared machine CPU time
leaves out the time other jobs held the core. Each side's best over the rounds is kept, as in
common.time_interleaved. Prints a markdown table (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULT = "RESULT "  # common.WORKER_RESULT; the worker runs inside another source tree
BATCH = {"unet": 16, "fpn": 2}
PEER = {"unet": "diffusers UNet2DModel", "fpn": "smp FPN('resnet50')"}


def worker(model: str, side: str, steps: int) -> dict:
  """In the tree under test (the working directory): build, compile and time one train step."""
  sys.path.insert(0, os.getcwd())
  _use_tree_configs(os.getcwd())
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  from benchmarks import xla_flags  # pylint: disable=g-import-not-at-top  (the tree's own)
  if side == "peer":
    call, compile_s = xla_flags.peer_call(model, xla_flags.peer_config(model, 256), BATCH[model]), 0.0
  else:
    program, _, _, _ = xla_flags.build(model, BATCH[model], 256)
    call, compile_s = program.call, program.compile_seconds
  call()
  wall, cpu = [], []
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return {"wall_s": min(wall), "cpu_s": min(cpu), "compile_s": compile_s, "load": os.getloadavg()[0]}


def _use_tree_configs(tree: str) -> None:
  """Import `satsynth_jax.configs` from the tree's configs/ (setup.py's package_dir), not the installed one."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  folder = os.path.join(tree, "configs")
  spec = importlib.util.spec_from_file_location("satsynth_jax.configs", os.path.join(folder, "__init__.py"),
                                                submodule_search_locations=[folder])
  module = importlib.util.module_from_spec(spec)
  sys.modules["satsynth_jax.configs"] = module
  spec.loader.exec_module(module)


def export(rev: str) -> str:
  """`git archive` of `rev` in a temporary folder."""
  folder = tempfile.mkdtemp(prefix=f"satsynth_{rev.replace('/', '_')}_")
  archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
  return folder


def run(model: str, side: str, tree: str, steps: int) -> dict | str:
  from satsynth_jax.infra import host_devices  # pylint: disable=g-import-not-at-top  (imports no jax)
  env = dict(os.environ, XLA_FLAGS=host_devices.CONV_FLAG, JAX_PLATFORMS="cpu")
  cmd = ["taskset", "-c", "0", sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", side,
         f"--models={model}", f"--steps={steps}"]
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  try:
    return common.run_worker(cmd, env, f"{model}, {side}", cwd=tree, timeout=None)
  except RuntimeError as e:  # one side failing (e.g. an old tree without a model) still prints the table
    return f"failed: {str(e).strip().splitlines()[-1][-300:]}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", default="HEAD", help="git revision timed as 'before'")
  parser.add_argument("--after", default=str(REPO), help="folder with the checkout timed as 'after'")
  parser.add_argument("--models", default="unet,fpn")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=4, help="timed calls per run (after one warm-up)")
  parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--worker", default="", choices=("", "ours", "peer"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  models = [m for m in args.models.split(",") if m]
  if args.worker:
    print(RESULT + json.dumps(worker(models[0], args.worker, args.steps)), flush=True)
    return
  sys.path.insert(0, str(REPO))
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  trees = {"before": export(args.before), "after": args.after}
  sides = [("before", "ours", trees["before"]), ("after", "ours", trees["after"])]
  if args.peer:
    sides.append(("peer", "peer", trees["after"]))
  load = common.load_average()
  best: dict = {}
  for r in range(args.rounds):
    for model in models:
      for name, side, tree in sides:
        result = run(model, side, tree, args.steps)
        print(f"round {r + 1} {model} {name}: {result}", file=sys.stderr, flush=True)
        old = best.get((model, name))
        if isinstance(result, dict):
          best[(model, name)] = result if not isinstance(old, dict) else {
              **old, "wall_s": min(old["wall_s"], result["wall_s"]), "cpu_s": min(old["cpu_s"], result["cpu_s"])}
        elif old is None:
          best[(model, name)] = result
  rows = []
  for model in models:
    get = lambda name: best.get((model, name))
    ips = lambda name, key: BATCH[model] / get(name)[key] if isinstance(get(name), dict) else None
    fmt = lambda x: common.fmt(x) if x else "-"
    ratio = lambda a, b: common.fmt(a / b) if a and b else "-"
    for key, label in (("wall_s", "wall"), ("cpu_s", "CPU")):
      before, after, peer = ips("before", key), ips("after", key), ips("peer", key)
      rows.append([model, label, fmt(before), fmt(after), ratio(after, before), fmt(peer), ratio(before, peer),
                   ratio(after, peer)])
  print(f"- {common.cpu_model()}, one pinned core; before = `{args.before}`, after = `{args.after}`; "
        f"{args.rounds} rounds x {args.steps} steps, best kept; load average {load} at the start, "
        f"{common.load_average()} at the end")
  for model in models:
    for name, _, _ in sides:
      r = best.get((model, name))
      if isinstance(r, dict) and r["compile_s"]:
        print(f"- {model} {name}: compile {r['compile_s']:.1f} s")
      elif not isinstance(r, dict):
        print(f"- {model} {name}: {r}")
  print()
  print(common.markdown_table(["model", "time", "before img/s", "after img/s", "after / before",
                               "peer img/s", "before / peer", "after / peer"], rows))


if __name__ == "__main__":
  main()
