"""Diffusion U-Net throughput: our Flax U-Net (G) beside diffusers' UNet2DModel, in one process.

Run from the repository root (needs the `bench` extra for the peer):

  python -m benchmarks.diffusion --configs=demo,isaid --dtype=float32

For each config it builds G from `config.diffusion.model` and the same architecture in diffusers
(block_out_channels = ch * ch_mult, attention blocks exactly at `attn_resolutions`, one
head, GroupNorm 32, DDPM time embedding; parameter counts must agree within 2%), then
times, on the same batch size and compute dtype:
  train step   sample timesteps and noise, forward, backward, clip, Adam, EMA update
               (satsynth_jax.train.diffusion.train_step; torch.optim.Adam + AveragedModel)
  DDPM / DDIM  the full reverse process (satsynth_jax's lax.scan samplers; diffusers'
               DDPMScheduler / DDIMScheduler loop under torch.inference_mode)
On CPU the samplers run only --sample_steps denoiser steps and the time is scaled to the
full run (marked "extrapolated"): a step costs the same whatever the run's length.
Calls of the two sides alternate and the best round counts (common.time_interleaved); JAX
compile time is reported apart. GFLOP/img comes from XLA's cost analysis of the compiled
JAX programs; "% peak" divides achieved FLOP/s by the device's peak (common.peak_flops).
The peer's "% peak" uses the same FLOP count: the architectures match. Prints markdown
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from satsynth_jax import generator
from satsynth_jax.configs import demo, isaid
from satsynth_jax.infra import parallel
from satsynth_jax.train import diffusion

CONFIGS = {"demo": demo, "isaid": isaid}
CPU_BATCH = {"demo": 16, "isaid": 2}  # keeps a CPU run of both configs within minutes
CPU_STEPS = 3
ACCELERATOR_STEPS = 20
CPU_SAMPLE_STEPS = 2
PARAM_TOLERANCE = 0.02


@dataclasses.dataclass
class Row:
  program: str
  images_per_call: float  # images one timed call stands for (after extrapolation)
  flops_per_image: float
  compile_seconds: float
  ours_seconds: float  # best timed call
  peer_seconds: float | None


class JaxUNet:
  """G as the training loop and the sampler build it: one mesh over all devices, batch-sharded."""

  def __init__(self, config, batch: int):
    self.config, self.batch = config, batch
    self.model = generator.build_g(config)
    config.diffusion.train.sample_every = 0  # no preview grid: only the step is timed
    config.diffusion.train.batch_size = batch
    # The loop's own task and jitted step (its input pipeline is never opened here).
    setup = common.task_setup(diffusion.make_task(config, "unused-workdir", parallel.make_mesh()), batch, config.seed)
    self.mesh, self.batched, self.state, self.step = setup.mesh, setup.batched, setup.state, setup.step
    size, channels = config.data.image_size, generator.joint_channels(config)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
    self.x = jax.device_put(x, self.batched)

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.state.params))

  def forward_flops_per_image(self) -> float:
    """One denoiser call (what each sampling step costs), from XLA's cost analysis."""
    apply = jax.jit(lambda params, x, t: self.model.apply({"params": params}, x, t))
    compiled, _ = common.compile_jax(apply, self.state.params, self.x, jnp.zeros((self.batch,), jnp.int32))
    return common.xla_flops(compiled) / self.batch

  def train_program(self) -> tuple[common.Program, float]:
    """(one optimizer step on the batch, its FLOPs per image)."""
    batch = {"x": self.x}
    with jax.set_mesh(self.mesh):
      compiled, compile_s = common.compile_jax(self.step, self.state, batch)
      self.train_compiled = compiled  # kept for HLO inspection (benchmarks/xla_flags.py --profile)

    def call():
      self.state, metrics = compiled(self.state, batch)
      jax.block_until_ready((self.state, metrics))

    return common.Program(call, compile_s), common.xla_flops(compiled) / self.batch

  def sampler_program(self, sampler: str, run_steps: int) -> common.Program:
    """One `sampler` run of `run_steps` denoiser steps on the whole batch."""
    config = self.config
    if sampler == "ddpm":  # a shorter schedule: DDPM runs one step per timestep
      config = copy.deepcopy(config)
      config.diffusion.timesteps = run_steps
    generate = generator.make_generate_fn(config, self.model, self.mesh, self.batch, sampler=sampler,
                                          ddim_steps=run_steps)
    params, rng = self.state.params, jax.random.key(1)
    with jax.set_mesh(self.mesh):
      compiled, compile_s = common.compile_jax(generate, params, rng)
    return common.Program(lambda: compiled(params, rng).block_until_ready(), compile_s)


def diffusers_unet(config):
  """diffusers' UNet2DModel laid out like `config.diffusion.model` (Ho et al.'s DDPM network)."""
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top  (the `bench` extra)

  m, size = config.diffusion.model, config.data.image_size
  resolutions = [size // 2**level for level in range(len(m.ch_mult))]
  channels = generator.joint_channels(config)
  return UNet2DModel(
      sample_size=size, in_channels=channels, out_channels=channels,
      block_out_channels=tuple(m.ch * mult for mult in m.ch_mult),
      layers_per_block=m.num_res_blocks,
      down_block_types=tuple("AttnDownBlock2D" if r in m.attn_resolutions else "DownBlock2D" for r in resolutions),
      up_block_types=tuple("AttnUpBlock2D" if r in m.attn_resolutions else "UpBlock2D" for r in reversed(resolutions)),
      attention_head_dim=None,  # one head as wide as the block, as in ours
      norm_num_groups=32, norm_eps=1e-6, dropout=m.dropout,
      flip_sin_to_cos=False, freq_shift=1,  # [sin, cos] over exp(-log(1e4) i / (half - 1)), as in ours
  )


class DiffusersUNet:
  """The peer: the same network, optimizer step and samplers in PyTorch + diffusers, eager mode."""

  def __init__(self, config, batch: int, dtype: str, torch, device, compile_model: bool = False):
    self.config, self.batch, self.torch, self.device = config, batch, torch, device
    torch.manual_seed(config.seed)
    self.model = diffusers_unet(config).to(device)
    # torch.compile wraps the forward only: the optimizer, clipping and EMA see the same parameters.
    self.forward = torch.compile(self.model) if compile_model else self.model
    size, channels = config.data.image_size, generator.joint_channels(config)
    self.shape = (batch, channels, size, size)
    self.x = torch.rand(self.shape, device=device) * 2 - 1
    # bfloat16 as ours: float32 params, bfloat16 compute where autocast allows it.
    self.autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                      enabled=dtype == "bfloat16")
    d = config.diffusion
    self.schedule_kwargs = dict(num_train_timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                                beta_schedule="linear", clip_sample=True)
    abar = np.asarray(generator.make_schedule(config).alphas_cumprod)
    self.alphas_cumprod = torch.tensor(abar, device=device)

  @property
  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def train_call(self) -> common.Call:
    """One optimizer step on the batch."""
    torch, t = self.torch, self.config.diffusion.train
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # pylint: disable=g-import-not-at-top

    optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr)
    ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay)) if t.ema_decay > 0 else None

    def call():
      self.model.train()
      timesteps = torch.randint(0, self.config.diffusion.timesteps, (self.batch,), device=self.device)
      noise = torch.randn_like(self.x)
      abar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
      xt = abar.sqrt() * self.x + (1 - abar).sqrt() * noise
      with self.autocast():
        out = self.forward(xt, timesteps).sample
      loss = torch.nn.functional.mse_loss(out.float(), noise)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
      optimizer.step()
      if ema is not None:
        ema.update_parameters(self.model)
      self.sync()

    return call

  def sampler_call(self, sampler: str, run_steps: int, total_steps: int) -> common.Call:
    """The first `run_steps` steps of a `total_steps` diffusers sampling loop on the whole batch."""
    torch = self.torch
    from diffusers import DDIMScheduler, DDPMScheduler  # pylint: disable=g-import-not-at-top

    if sampler == "ddpm":
      scheduler = DDPMScheduler(variance_type="fixed_small", **self.schedule_kwargs)
    else:  # trailing spacing, eta 0 and a final step to x0, like satsynth_jax's sample_ddim
      scheduler = DDIMScheduler(set_alpha_to_one=True, timestep_spacing="trailing", **self.schedule_kwargs)
    scheduler.set_timesteps(total_steps, device=self.device)
    timesteps = scheduler.timesteps[:run_steps]

    def call():
      self.model.eval()
      with torch.inference_mode(), self.autocast():
        x = torch.randn(self.shape, device=self.device)
        for t in timesteps:
          eps = self.forward(x, t).sample.float()
          x = scheduler.step(eps, t, x).prev_sample
      self.sync()

    return call


def timed_row(label: str, images_per_call: float, flops_per_image: float, program: common.Program,
              peer_call: common.Call | None, iterations: int) -> Row:
  calls = [program.call] + ([peer_call] if peer_call else [])
  seconds = common.time_interleaved(calls, iterations)
  return Row(label, images_per_call, flops_per_image, program.compile_seconds, seconds[0],
             seconds[1] if peer_call else None)


def benchmark_config(name: str, args, torch, device) -> tuple[list[object], list[Row]]:
  config = CONFIGS[name].get_config()
  config.dtype = args.dtype
  on_cpu = jax.default_backend() == "cpu"
  batch = args.batch or (CPU_BATCH[name] if on_cpu else config.diffusion.train.batch_size)
  iterations = args.steps or (CPU_STEPS if on_cpu else ACCELERATOR_STEPS)
  sample_steps = CPU_SAMPLE_STEPS if args.sample_steps is None and on_cpu else args.sample_steps or 0
  config.diffusion.train.batch_size = batch

  ours = JaxUNet(config, batch)
  peer = DiffusersUNet(config, batch, args.dtype, torch, device) if torch is not None else None
  if peer is not None:
    ratio = ours.num_params / peer.num_params
    assert abs(ratio - 1) <= PARAM_TOLERANCE, (
        f"{name}: diffusers UNet2DModel has {peer.num_params} params, ours {ours.num_params}: "
        f"the architectures differ by more than {PARAM_TOLERANCE:.0%}")
  m, size = config.diffusion.model, config.data.image_size
  model_row = [name, f"{size}x{size}x{generator.joint_channels(config)}",
               f"ch {m.ch}, mult {tuple(m.ch_mult)}, {m.num_res_blocks} blocks, attn {tuple(m.attn_resolutions)}",
               batch, args.dtype, f"{ours.num_params:,}", f"{peer.num_params:,}" if peer else "-"]

  train, train_flops = ours.train_program()
  rows = [timed_row("train step", batch, train_flops, train, peer.train_call() if peer else None, iterations)]
  forward_flops = ours.forward_flops_per_image()
  for sampler, total in (("ddpm", config.diffusion.timesteps), ("ddim", args.ddim_steps)):
    run_steps = min(sample_steps, total) if sample_steps else total
    label = f"{sampler.upper()} {total} steps"
    if run_steps < total:
      label += f" (extrapolated from {run_steps})"
    peer_call = peer.sampler_call(sampler, run_steps, total) if peer else None
    rows.append(timed_row(label, batch * run_steps / total, forward_flops * total,
                          ours.sampler_program(sampler, run_steps), peer_call, iterations))
  return model_row, rows


def throughput_row(name: str, row: Row, peak: float) -> list[object]:
  ours_ips = row.images_per_call / row.ours_seconds
  peer_ips = row.images_per_call / row.peer_seconds if row.peer_seconds else None
  percent = lambda ips: None if ips is None else 100 * ips * row.flops_per_image / peak
  return [name, row.program, common.fmt(row.flops_per_image / 1e9), common.fmt(row.compile_seconds),
          common.fmt(ours_ips), common.fmt(percent(ours_ips), 2), common.fmt(peer_ips), common.fmt(percent(peer_ips), 2),
          common.fmt(ours_ips / peer_ips if peer_ips else None)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="demo,isaid", help=f"comma-separated, from {sorted(CONFIGS)}")
  parser.add_argument("--batch", type=int, default=0,
                      help=f"global batch; 0: the config's train.batch_size, on CPU {CPU_BATCH}")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  parser.add_argument("--steps", type=int, default=0,
                      help=f"timed calls per program; 0: {CPU_STEPS} on CPU, {ACCELERATOR_STEPS} elsewhere")
  parser.add_argument("--sample_steps", type=int, default=None,
                      help="denoiser steps per timed sampler run, scaled to the full run; 0: full runs "
                           f"(default on accelerators; {CPU_SAMPLE_STEPS} on CPU)")
  parser.add_argument("--ddim_steps", type=int, default=50)
  parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                      help="also time diffusers' UNet2DModel (needs torch + diffusers)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s of one device; 0: datasheet figure, or measured on CPU")
  args = parser.parse_args()
  names = [n.strip() for n in args.configs.split(",") if n.strip()]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
  if args.sample_steps == 1:
    parser.error("--sample_steps=1: use 0 (full runs) or at least 2 (a DDPM schedule needs 2 steps)")

  torch, device = common.setup_torch() if args.peer else (None, None)
  load_before = common.load_average()

  def run_all():
    return [benchmark_config(name, args, torch, device) for name in names]

  results, peak, peak_source = common.peak_flops_around(run_all, args.dtype, args.peak_tflops)
  print("\n".join(common.machine_lines(torch, device)))
  print(f"- load average (1, 5, 15 min): {load_before} at the start, {common.load_average()} at the end")
  print(f"- peak: {peak / 1e12:.3g} TFLOP/s ({peak_source})\n")
  model_rows = [model_row for model_row, _ in results]
  throughput_rows = [throughput_row(name, row, peak) for name, (_, rows) in zip(names, results) for row in rows]
  print(common.markdown_table(
      ["config", "input", "U-Net", "batch", "dtype", "JAX params", "diffusers params"], model_rows))
  print()
  print(common.markdown_table(
      ["config", "program", "GFLOP/img", "JAX compile s", "JAX img/s", "JAX % peak", "diffusers img/s",
       "diffusers % peak", "JAX / diffusers"], throughput_rows))


if __name__ == "__main__":
  main()
