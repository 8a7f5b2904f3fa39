"""Segmenter throughput: our FPN-ResNet50 beside segmentation-models-pytorch's FPN, in one process.

Run from the repository root (needs the `bench` extra for the peer):

  python -m benchmarks.segmentation --size=256 --dtype=float32

Times, at the same batch size, resolution and compute dtype:
  train step  forward in training mode (BatchNorm batch statistics), masked cross-entropy,
              backward, AdamW (satsynth_jax.train.segmentation.train_step;
              torch.optim.AdamW + nn.CrossEntropyLoss(ignore_index))
  eval        forward with running statistics, then the per-pixel argmax
The peer is `smp.FPN("resnet50", encoder_weights=None, classes=K)`: randomly initialised,
nothing is downloaded. Its head is smp's FPN decoder, not Panoptic FPN's semantic branch
(ours), so the parameter counts differ by design; both are printed. Calls of the two sides
alternate and the best round counts (common.time_interleaved); JAX compile time is
reported apart. GFLOP/img: XLA's cost analysis of our compiled programs (every op), torch's
FlopCounterMode for the peer (matmuls and convolutions, which dominate); the heads differ,
so the FLOPs do too. "% peak" is achieved FLOP/s over common.peak_flops. Prints markdown
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from satsynth_jax import resolved, segmenter
from satsynth_jax.configs import isaid
from satsynth_jax.infra import parallel
from satsynth_jax.train import segmentation

CPU_BATCH = 2
CPU_STEPS = 3
ACCELERATOR_STEPS = 20


class JaxFPN:
  """Our segmenter as `--mode=train_segmentation` builds it: one mesh over all devices, batch-sharded."""

  def __init__(self, config, batch: int):
    self.config, self.batch = config, batch
    run = resolved.SegmenterRun.from_config(config)
    self.model = segmenter.build(config, run.architecture)
    config.segmentation.train.batch_size = batch
    # The loop's own task and jitted step (its input pipeline is never opened here).
    setup = common.task_setup(segmentation.make_task(config, "unused-workdir", parallel.make_mesh(), run), batch,
                              config.seed)
    self.mesh, self.batched, self.state, self.step = setup.mesh, setup.batched, setup.state, setup.step
    self.replicated = parallel.replicated(self.mesh)
    images, masks = random_batch(batch, config.data.image_size, config.data.num_classes)
    self.batch_arrays = jax.device_put(
        {"image": images, "mask": masks, "is_synthetic": np.zeros((batch,), bool)}, self.batched)

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.state.params))

  def train_program(self) -> tuple[common.Program, float]:
    """(one optimizer step on the batch, its FLOPs per image)."""
    with jax.set_mesh(self.mesh):
      compiled, compile_s = common.compile_jax(self.step, self.state, self.batch_arrays)
      self.train_compiled = compiled  # kept for HLO inspection (benchmarks/xla_flags.py --profile)

    def call():
      self.state, metrics = compiled(self.state, self.batch_arrays)
      jax.block_until_ready((self.state, metrics))

    return common.Program(call, compile_s), common.xla_flops(compiled) / self.batch

  def eval_program(self) -> tuple[common.Program, float]:
    """(predicted classes for the batch, its FLOPs per image)."""

    def predict(variables, images):
      return jnp.argmax(self.model.apply(variables, images, train=False), axis=-1)

    predict = jax.jit(predict, in_shardings=(self.replicated, self.batched), out_shardings=self.batched)
    # Read at call time: train steps donate (delete) the arrays of earlier states.
    variables = lambda: {"params": self.state.params, "batch_stats": self.state.batch_stats}
    images = self.batch_arrays["image"]
    with jax.set_mesh(self.mesh):
      compiled, compile_s = common.compile_jax(predict, variables(), images)
    program = common.Program(lambda: compiled(variables(), images).block_until_ready(), compile_s)
    return program, common.xla_flops(compiled) / self.batch


class SmpFPN:
  """The peer: smp's FPN-ResNet50, trained and evaluated in eager PyTorch, NCHW."""

  def __init__(self, config, batch: int, dtype: str, torch, device, compile_model: bool = False):
    import segmentation_models_pytorch as smp  # pylint: disable=g-import-not-at-top  (the `bench` extra)

    self.config, self.batch, self.torch, self.device = config, batch, torch, device
    torch.manual_seed(config.seed)
    self.model = smp.FPN("resnet50", encoder_weights=None, classes=config.data.num_classes).to(device)
    self.forward = torch.compile(self.model) if compile_model else self.model  # the optimizer sees the same params
    images, masks = random_batch(batch, config.data.image_size, config.data.num_classes)
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    self.masks = torch.from_numpy(masks).long().to(device)
    self.autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                      enabled=dtype == "bfloat16")

  @property
  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def counted(self, call: common.Call) -> tuple[common.Call, float]:
    """(call, its matmul + convolution FLOPs per image, counted by torch over one untimed call)."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top

    with FlopCounterMode(display=False) as counter:
      call()
    return call, counter.get_total_flops() / self.batch

  def train_call(self) -> tuple[common.Call, float]:
    """(one optimizer step on the batch, its FLOPs per image)."""
    torch, t = self.torch, self.config.segmentation.train
    optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=self.config.data.ignore_index)

    def call():
      self.model.train()
      with self.autocast():
        logits = self.forward(self.images)
      loss = criterion(logits.float(), self.masks)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      self.sync()

    return self.counted(call)

  def eval_call(self) -> tuple[common.Call, float]:
    """(predicted classes for the batch, its FLOPs per image)."""
    torch = self.torch

    def call():
      self.model.eval()
      with torch.inference_mode(), self.autocast():
        self.forward(self.images).argmax(dim=1)
      self.sync()

    return self.counted(call)


def random_batch(batch: int, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Images in [0, 1] (NHWC float32) and class masks with some ignored pixels."""
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
  masks = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
  masks[:, :8] = 255  # a no-data strip: both losses must skip it
  return images, masks


def benchmark(config, batch: int, iterations: int, dtype: str, torch, device) -> tuple[list[object], list[tuple]]:
  """(the models row, [(program, JAX compile s, (JAX FLOPs/img, img/s), (peer FLOPs/img, img/s) or None)])."""
  ours = JaxFPN(config, batch)
  peer = SmpFPN(config, batch, dtype, torch, device) if torch is not None else None
  size = config.data.image_size
  models = [f"{size}x{size}x3", config.data.num_classes, batch, dtype, f"{ours.num_params:,}",
            f"{peer.num_params:,}" if peer else "-"]
  programs = (("train step", ours.train_program, peer.train_call if peer else None),
              ("eval (forward + argmax)", ours.eval_program, peer.eval_call if peer else None))
  rows = []
  for label, make_program, make_peer_call in programs:
    program, flops = make_program()
    peer_call, peer_flops = make_peer_call() if make_peer_call else (None, None)
    seconds = common.time_interleaved([program.call] + ([peer_call] if peer_call else []), iterations)
    rows.append((label, program.compile_seconds, (flops, batch / seconds[0]),
                 (peer_flops, batch / seconds[1]) if peer_call else None))
  return models, rows


def table_row(label: str, compile_s: float, ours: tuple[float, float], peer: tuple[float, float] | None,
              peak: float) -> list[str]:
  percent = lambda flops, ips: common.fmt(100 * flops * ips / peak, 2)
  peer_cells = ([common.fmt(peer[0] / 1e9), common.fmt(peer[1]), percent(*peer), common.fmt(ours[1] / peer[1])]
                if peer else ["-"] * 4)
  return [label, common.fmt(ours[0] / 1e9), common.fmt(compile_s), common.fmt(ours[1]), percent(*ours), *peer_cells]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256, help="square input side (a multiple of 32)")
  parser.add_argument("--num_classes", type=int, default=0, help="K; 0: iSAID's 16")
  parser.add_argument("--batch", type=int, default=0,
                      help=f"global batch; 0: segmentation.train.batch_size, on CPU {CPU_BATCH}")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  parser.add_argument("--steps", type=int, default=0,
                      help=f"timed calls per program; 0: {CPU_STEPS} on CPU, {ACCELERATOR_STEPS} elsewhere")
  parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                      help="also time segmentation-models-pytorch's FPN (needs torch + smp)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s of one device; 0: datasheet figure, or measured on CPU")
  args = parser.parse_args()
  if args.size % 32:
    parser.error(f"--size={args.size}: must be a multiple of 32 (smp's FPN needs it)")

  config = isaid.get_config()
  config.dtype = args.dtype
  config.data.image_size = args.size
  if args.num_classes:
    config.data.num_classes = args.num_classes
  on_cpu = jax.default_backend() == "cpu"
  batch = args.batch or (CPU_BATCH if on_cpu else config.segmentation.train.batch_size)
  iterations = args.steps or (CPU_STEPS if on_cpu else ACCELERATOR_STEPS)

  torch, device = common.setup_torch() if args.peer else (None, None)
  load_before = common.load_average()
  (models, rows), peak, peak_source = common.peak_flops_around(
      lambda: benchmark(config, batch, iterations, args.dtype, torch, device), args.dtype, args.peak_tflops)
  print("\n".join(common.machine_lines(torch, device)))
  print(f"- load average (1, 5, 15 min): {load_before} at the start, {common.load_average()} at the end")
  print(f"- peak: {peak / 1e12:.3g} TFLOP/s ({peak_source})\n")
  print(common.markdown_table(["input", "K", "batch", "dtype", "JAX FPN params", "smp FPN params"], [models]))
  print()
  print(common.markdown_table(
      ["program", "JAX GFLOP/img", "JAX compile s", "JAX img/s", "JAX % peak", "smp GFLOP/img", "smp img/s",
       "smp % peak", "JAX / smp"],
      [table_row(*row, peak) for row in rows]))


if __name__ == "__main__":
  main()
