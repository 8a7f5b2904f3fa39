"""`--mode=sample` end to end beside the bare jitted sampler: does writing the set cost denoising time?

Run from the repository root:

  python -m benchmarks.sampling --config=demo

Builds a temporary workdir (the config's demo data, then G trained for --train_steps steps so
that a real checkpoint exists), then times, alternating, best of --rounds:
  sample mode  satsynth_jax.jobs.sample.run: restore G, draw every shard, decode, encode PNGs, write
               TFRecord shards, the manifest and the report PNGs (the set is deleted between runs)
  sampler      the same generate program (generator.make_generate_fn, same batch, sampler and
               steps) called as often as the sample mode calls it, blocking on the last batch
sample.run overlaps the host's encoding and writing of one shard with the next shard's
denoising, so its images/s should come close to the bare sampler's. Compilation is kept out of
both: a persistent compilation cache (the caller's if set, else a temporary one; warmed by an
untimed first run) serves sample.run's program, and the bare sampler is compiled ahead of time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import shutil
import tempfile
import time

import jax

from benchmarks import common

CPU_OVERRIDES = {  # a short train run and a small set: minutes on a CPU
    "diffusion.train.num_steps": 1, "diffusion.train.checkpoint_every": 1, "diffusion.train.sample_every": 0,
    "diffusion.train.log_every": 1,
}


@dataclasses.dataclass
class Result:
  pairs: int
  calls: int  # generate calls (batches) per set
  sample_mode_s: float
  sampler_s: float


def make_workdir(config, workdir: str) -> None:
  """Demo records plus a briefly trained G checkpoint: what `--mode=sample` needs."""
  from satsynth_jax.jobs import prepare, train_diffusion  # pylint: disable=g-import-not-at-top
  prepare.run(config, workdir)
  train_diffusion.run(config, workdir)


def sampler_call(config, workdir: str, calls: int) -> common.Call:
  """`calls` runs of the generate program sample.run builds, on its restored params."""
  from satsynth_jax import generator  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  s = config.sample
  mesh = parallel.make_mesh(jax.local_devices())
  gconfig, model, params, _ = generator.restore_g(config, workdir, mesh, s.checkpoint_step)
  generate = generator.make_generate_fn(gconfig, model, mesh, s.batch_size, sampler=s.sampler,
                                        ddim_steps=s.ddim_steps, ddim_eta=s.ddim_eta)
  key = jax.random.key(0)
  with jax.set_mesh(mesh):
    compiled, _ = common.compile_jax(generate, params, key)

  def call():
    with jax.set_mesh(mesh):  # dispatched back to back, as sample.run does within a shard
      out = [compiled(params, jax.random.fold_in(key, i)) for i in range(calls)]
    jax.block_until_ready(out)

  return call


def sample_mode_call(config, workdir: str) -> common.Call:
  """One full `--mode=sample` run into a fresh synthetic set."""
  from satsynth_jax import resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.jobs import sample  # pylint: disable=g-import-not-at-top
  out = resolved.synthetic_dir(config, workdir)

  def call():
    shutil.rmtree(out, ignore_errors=True)
    sample.run(config, workdir)

  return call


def benchmark(config, workdir: str, rounds: int) -> Result:
  from satsynth_jax import resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.data import records  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import workdir as layout  # pylint: disable=g-import-not-at-top
  num_real = records.read_manifest(layout.data_dir(workdir, "train"))["num_examples"]
  pairs = resolved.pool_factor(config) * config.sample.per_real * num_real
  s = config.sample
  calls = sum(math.ceil(min(s.examples_per_shard, pairs - start) / s.batch_size)
              for start in range(0, pairs, s.examples_per_shard))
  seconds = common.time_interleaved([sample_mode_call(config, workdir), sampler_call(config, workdir, calls)],
                                    rounds)
  return Result(pairs, calls, *seconds)


def enable_compilation_cache(path: str) -> None:
  """So that timed sample.run calls load their program instead of compiling it again."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def report(config, result: Result) -> str:
  s = config.sample
  mode_ips, sampler_ips = result.pairs / result.sample_mode_s, result.pairs / result.sampler_s
  return common.markdown_table(
      ["program", "pairs", "batch", "sampler", "s", "pairs/s", "/ sampler"],
      [["`--mode=sample` end to end (sample.run)", result.pairs, s.batch_size, f"{s.sampler} {s.ddim_steps}",
        common.fmt(result.sample_mode_s), common.fmt(mode_ips), common.fmt(mode_ips / sampler_ips)],
       ["jitted sampler alone (same calls)", result.pairs, s.batch_size, f"{s.sampler} {s.ddim_steps}",
        common.fmt(result.sampler_s), common.fmt(sampler_ips), "1"]])


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="dotted config override, a Python literal (repeatable), e.g. sample.batch_size=32")
  parser.add_argument("--rounds", type=int, default=2, help="timed rounds after one untimed warm-up")
  parser.add_argument("--workdir", default="", help="reuse this workdir (made if empty); default: a temp dir")
  args = parser.parse_args(argv)
  overrides = {**CPU_OVERRIDES, **common.parse_overrides(args.set)}
  config = common.overridden(importlib.import_module(f"satsynth_jax.configs.{args.config}").get_config(), overrides)
  load = common.load_average()
  with tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
    workdir = args.workdir or os.path.join(tmp, "workdir")
    if not jax.config.jax_compilation_cache_dir:  # keep the caller's cache (the test suite's) if it has one
      enable_compilation_cache(os.path.join(tmp, "jax_cache"))
    if not os.path.exists(os.path.join(workdir, "checkpoints")):
      start = time.perf_counter()
      make_workdir(config, workdir)
      print(f"- workdir made in {time.perf_counter() - start:.0f} s (data + {config.diffusion.train.num_steps} "
            "train steps)")
    result = benchmark(config, workdir, args.rounds)
  lines = ["\n".join(common.machine_lines()),
           f"- load average (1, 5, 15 min): {load} at the start, {common.load_average()} at the end",
           f"- config {args.config}, overrides {args.set or 'none'}; {result.calls} generate calls per set\n",
           report(config, result)]
  text = "\n".join(lines)
  print(text)
  return text


if __name__ == "__main__":
  main()
