"""Accelerator check: G's train step and samplers and the FPN train step against their PyTorch peers,
appended as a dated section to a RESULTS file. Run through benchmarks/accelerator.sh.

  python -m benchmarks.accelerator                       # the paper's 128 px G (configs/isaid.py)
  python -m benchmarks.accelerator --tiny --no-peer --output=/tmp/RESULTS.md   # CPU smoke run

Measures, each side's best call after a warm-up, sides alternating (common.time_interleaved):
  peak        a large bfloat16 matmul's TFLOP/s, beside the datasheet's dense bf16 figure
  train step  G (float32 and bfloat16) vs diffusers' UNet2DModel, eager and torch.compile
  sampling    DDIM (--ddim_steps) and DDPM vs diffusers' scheduler loops (DDPM extrapolated
              from --ddpm_run_steps steps: every step costs the same)
  FPN         the segmenter's train step vs smp FPN('resnet50'), eager
"% bf16 peak" is achieved FLOP/s (XLA's cost analysis) over the datasheet bf16 figure when the
device is known, else over the measured matmul. Stages that would start after --budget_s are
skipped and say so, so the whole run fits the device time it is given.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time

import jax
import jax.numpy as jnp

from benchmarks import common, diffusion, segmentation

TINY_UNET = {  # a U-Net that compiles in seconds on a CPU
    "diffusion.model.ch": 32, "diffusion.model.ch_mult": (1,), "diffusion.model.num_res_blocks": 1,
    "diffusion.model.attn_resolutions": (), "diffusion.timesteps": 50, "data.image_size": 8,
}
TINY_FPN = {"segmentation.backbone_stages": (1, 1, 1, 1), "segmentation.base_width": 16, "data.image_size": 32}
HEADER = ["model", "program", "dtype", "batch", "GFLOP/img", "JAX img/s", "JAX % bf16 peak", "peer",
          "peer img/s", "torch.compile img/s", "JAX / peer", "JAX / torch.compile"]
RESULTS_ENV = "SATSYNTH_BENCH_RESULTS"


def matmul_tflops(n: int, repeats: int = 10) -> float:
  """Best TFLOP/s of an n x n bfloat16 matmul (float32 accumulation) on the default device."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best / 1e12


def _timed(call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def datasheet_bf16_tflops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((bf16 for name, bf16, _ in common.PEAK_TFLOPS if name in kind), None)


class Run:
  """The stages' shared settings, the rows so far and the time budget."""

  def __init__(self, args, torch, device, peak_tflops: float):
    self.args, self.torch, self.device, self.peak = args, torch, device, peak_tflops * 1e12
    self.start, self.rows, self.skipped = time.perf_counter(), [], []

  def has_time(self, stage: str) -> bool:
    if time.perf_counter() - self.start < self.args.budget_s:
      return True
    self.skipped.append(stage)
    return False

  def add(self, model, program, dtype, batch, flops, images, seconds, peer_name="-"):
    """seconds: [ours, peer eager or None, peer compiled or None]; `images` per timed call."""
    ips = [images / s if s else None for s in seconds] + [None] * (3 - len(seconds))
    ratio = lambda other: common.fmt(ips[0] / other) if other else "-"
    self.rows.append([model, program, dtype, batch, common.fmt(flops / 1e9), common.fmt(ips[0]),
                      common.fmt(100 * ips[0] * flops / self.peak, 2), peer_name if ips[1] else "-",
                      common.fmt(ips[1]), common.fmt(ips[2]), ratio(ips[1]), ratio(ips[2])])


def unet_config(args, dtype: str):
  from satsynth_jax.configs import demo, isaid  # pylint: disable=g-import-not-at-top
  config = common.overridden(demo.get_config(), TINY_UNET) if args.tiny else isaid.get_config()
  config.dtype = dtype
  return config


def unet_train(run: Run, dtype: str) -> None:
  args, torch = run.args, run.torch
  config = unet_config(args, dtype)
  ours = diffusion.JaxUNet(config, args.unet_batch)
  program, flops = ours.train_program()
  calls = [program.call]
  if torch is not None:
    calls.append(diffusion.DiffusersUNet(config, args.unet_batch, dtype, torch, run.device).train_call())
    if args.torch_compile:
      compiled = diffusion.DiffusersUNet(config, args.unet_batch, dtype, torch, run.device, compile_model=True)
      calls.append(compiled.train_call())
  seconds = common.time_interleaved(calls, args.steps)
  run.add("G (U-Net)", "train step", dtype, args.unet_batch, flops, args.unet_batch, seconds,
          "diffusers UNet2DModel")


def unet_sampling(run: Run, dtype: str) -> None:
  args, torch = run.args, run.torch
  config = unet_config(args, dtype)
  ours = diffusion.JaxUNet(config, args.unet_batch)
  peer = diffusion.DiffusersUNet(config, args.unet_batch, dtype, torch, run.device) if torch is not None else None
  forward = ours.forward_flops_per_image()
  for sampler, total, steps in (("ddim", args.ddim_steps, args.ddim_steps),
                                ("ddpm", config.diffusion.timesteps, args.ddpm_run_steps)):
    steps = min(steps, total)
    program = ours.sampler_program(sampler, steps)
    calls = [program.call] + ([peer.sampler_call(sampler, steps, total)] if peer else [])
    seconds = common.time_interleaved(calls, args.sample_iterations)
    label = f"{sampler.upper()} {total} steps" + (f" (extrapolated from {steps})" if steps < total else "")
    run.add("G (U-Net)", label, dtype, args.unet_batch, forward * total, args.unet_batch * steps / total, seconds,
            "diffusers scheduler loop")


def fpn_train(run: Run, dtype: str) -> None:
  from satsynth_jax.configs import isaid  # pylint: disable=g-import-not-at-top
  args, torch = run.args, run.torch
  config = isaid.get_config()
  config.data.image_size = 256
  if args.tiny:
    common.overridden(config, TINY_FPN)
  config.dtype = dtype
  ours = segmentation.JaxFPN(config, args.fpn_batch)
  program, flops = ours.train_program()
  calls = [program.call]
  if torch is not None:
    calls.append(segmentation.SmpFPN(config, args.fpn_batch, dtype, torch, run.device).train_call()[0])
  seconds = common.time_interleaved(calls, args.steps)
  run.add("FPN-ResNet50" if not args.tiny else "FPN (tiny ResNet)", "train step", dtype, args.fpn_batch, flops,
          args.fpn_batch, seconds, "smp FPN('resnet50')")


def section(run: Run, measured: float, datasheet: float | None, load_before: str) -> str:
  dev = jax.devices()[0]
  title = f"## {datetime.date.today().isoformat()}: accelerator check on {dev.device_kind}"
  if run.args.tiny:
    title += " (--tiny smoke run: toy sizes, not a measurement)"
  peak = (f"datasheet dense bf16 {datasheet:.0f} TFLOP/s (the % column's base); "
          if datasheet else "no datasheet figure for this device: % is of the measured matmul; ")
  lines = [title, "", "`bash benchmarks/accelerator.sh " + " ".join(run.args.argv) + "`", "",
           *common.machine_lines(run.torch, run.device),
           f"- bf16 peak: {peak}measured {measured:.3g} TFLOP/s ({run.args.matmul}x{run.args.matmul} bf16 matmul)",
           f"- load average (1, 5, 15 min): {load_before} at the start, {common.load_average()} at the end",
           f"- wall time {time.perf_counter() - run.start:.0f} s; skipped for the time budget: "
           f"{', '.join(run.skipped) or 'none'}", "", common.markdown_table(HEADER, run.rows), ""]
  return "\n".join(lines)


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="toy sizes that run on a CPU in seconds (for tests)")
  parser.add_argument("--output", default=os.environ.get(RESULTS_ENV, ""),
                      help=f"RESULTS file to append to (env {RESULTS_ENV}); default benchmarks/RESULTS.md")
  parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                      help="also time torch.compile of the diffusers U-Net; default: on unless --tiny")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--budget_s", type=float, default=420, help="start no stage after this many seconds")
  parser.add_argument("--unet_batch", type=int, default=0, help="0: 64 (2 with --tiny)")
  parser.add_argument("--fpn_batch", type=int, default=0, help="0: 16 (2 with --tiny)")
  parser.add_argument("--steps", type=int, default=0, help="timed train calls; 0: 10 (2 with --tiny)")
  parser.add_argument("--sample_iterations", type=int, default=0, help="timed sampler runs; 0: 3 (1 with --tiny)")
  parser.add_argument("--ddim_steps", type=int, default=0, help="0: 50 (4 with --tiny)")
  parser.add_argument("--ddpm_run_steps", type=int, default=0, help="DDPM steps run, scaled to the full "
                      "schedule; 0: 50 (2 with --tiny)")
  parser.add_argument("--matmul", type=int, default=0, help="peak matmul side; 0: 8192 (256 with --tiny)")
  args = parser.parse_args(argv)
  tiny = args.tiny
  defaults = dict(unet_batch=(2, 64), fpn_batch=(2, 16), steps=(2, 10), sample_iterations=(1, 3),
                  ddim_steps=(4, 50), ddpm_run_steps=(2, 50), matmul=(256, 8192))
  for name, (small, full) in defaults.items():
    if not getattr(args, name):
      value = small if tiny else full
      # Batches split over every device (tests run on several CPU devices).
      setattr(args, name, math.lcm(value, jax.device_count()) if name.endswith("batch") else value)
  if args.torch_compile is None:
    args.torch_compile = not tiny
  args.output = args.output or os.path.join(os.path.dirname(__file__), "RESULTS.md")
  args.argv = list(argv) if argv is not None else []
  return args


def main(argv=None) -> str:
  import sys  # pylint: disable=g-import-not-at-top
  args = parse(argv if argv is not None else sys.argv[1:])
  load_before = common.load_average()
  torch, device = (None, None)
  if args.peer:
    try:
      torch, device = common.setup_torch()
      import diffusers  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      torch, device = None, None  # JAX-only: the peer columns say "-"
  measured, datasheet = matmul_tflops(args.matmul), datasheet_bf16_tflops()
  run = Run(args, torch, device, datasheet or measured)
  dtypes = [d for d in args.dtypes.split(",") if d]
  stages = [(f"G train {d}", unet_train, d) for d in dtypes]
  stages += [(f"G sampling {d}", unet_sampling, d) for d in dtypes]
  stages += [("FPN train float32", fpn_train, "float32")]
  for name, stage, dtype in stages:
    if run.has_time(name):
      print(f"[accelerator] {name} ({time.perf_counter() - run.start:.0f} s in)", file=sys.stderr, flush=True)
      stage(run, dtype)
  text = section(run, measured, datasheet, load_before)
  with open(args.output, "a", encoding="utf-8") as f:
    f.write("\n" + text)
  print(text)
  return text


if __name__ == "__main__":
  main()
