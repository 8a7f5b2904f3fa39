"""Where the PyTorch peers' train steps spend their CPU time, by the kinds `xla_flags --profile` uses.

Run from the repository root, pinned to one core like our profile:

  taskset -c 1 python -m benchmarks.peer_profile --model=unet          # diffusers UNet2DModel, batch 16
  taskset -c 1 python -m benchmarks.peer_profile --model=fpn --steps 2  # smp FPN('resnet50'), 256 px, batch 2

Builds the peer's train step as `xla_flags.peer_call` does, runs it once untimed, then profiles
`--steps` calls with torch.profiler (CPU activity) and sums each aten op's *self* CPU time (its
time minus its child ops', so nothing is counted twice) by kind: conv forward / backward,
dot, reduction, elementwise, copy / transpose, other. Prints a markdown table
`op kind | ms / step | share | ops / step` (comparable row by row with `xla_flags --profile`'s
`HLO kind` table; ops are kernel calls, an op with no child op of its own kind, like our thunks)
and the `--top` most expensive aten ops by name: the kernels PyTorch picked.

`kind_of` is a pure function of an op name (no torch at import), so its table is testable alone.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

CONV_BWD = "conv backward (input + filter)"
# (pattern searched in the op name, kind); the first match wins, so specific patterns come first.
# torch's CPU convolution backward computes both gradients in one call (`aten::convolution_backward`,
# reaching oneDNN through a stub the profiler does not see); only the explicit split ops, where a
# backend dispatches them, can be told apart.
KINDS = (
    (r"conv.*backward_(weight|filter)s?$", "conv backward-filter"),
    (r"conv.*backward_input$", "conv backward-input"),
    (r"conv.*backward", CONV_BWD),
    (r"conv(\d|_|olution)", "conv forward"),
    (r"::(mm|addmm|bmm|baddbmm|matmul|(mkldnn_)?linear\w*|_?scaled_dot_product\w*|_flash_attention\w*)$",
     "dot (attention, dense)"),
    (r"batch_norm|group_norm|layer_norm|_norm_backward|::(sum|mean|var|std|norm|_foreach_norm|"
     r"linalg_vector_norm|max|min|amax|amin|argmax|max_pool\w*|nll_loss\w*|_?softmax\w*|_?log_softmax\w*|"
     r"cross_entropy_loss|mse_loss\w*)\b",
     "reduction (norm statistics, sums)"),
    # Materialising copies only: views (view, t, permute, expand, ...) cost dispatch, not memory traffic.
    (r"::(copy_|_copy_from\w*|contiguous|clone|cat|stack|_to_copy|index|index_select|gather|scatter\w*|"
     r"upsample\w*|repeat|constant_pad_nd|pad)$", "copy / transpose"),
    (r"::(view|_unsafe_view|_reshape_alias|reshape|permute|transpose|t|expand|as_strided_?|slice|select|narrow|"
     r"flatten|unsqueeze|squeeze|alias|detach_?|to|lift_fresh|resolve_conj|resolve_neg|dropout|"
     r"new_\w+|empty\w*|zeros\w*|ones\w*|full\w*|resize_|fill_|zero_|set_|item|_local_scalar_dense|"
     r"randint|randn\w*|normal_|random_|uniform_|bernoulli_?|arange)$", "other (views, allocation, fill, rng)"),
    (r"::_?foreach_\w+$|::(add|sub|rsub|mul|div|neg|pow|sqrt|rsqrt|exp|log|sigmoid|silu|relu|gelu|tanh|"
     r"threshold|where|clamp|clamp_min|clamp_max|lerp|addcmul|addcdiv|maximum|minimum|abs|sign|reciprocal|"
     r"ge|gt|le|lt|eq|ne|masked_fill|logical_\w+|bitwise_\w+|sin|cos)(_backward)?_?$", "elementwise fusion"),
    (r"^aten::", "other (aten)"),
)


def kind_of(op_name: str) -> str:
  """The kind (as in xla_flags' `HLO kind` table) of a profiler event name; non-aten events (the
  autograd engine's and the optimizer's wrappers, Python annotations) are framework overhead."""
  if not op_name.startswith("aten::"):
    return "other (autograd engine, optimizer Python)"
  for pattern, kind in KINDS:
    if re.search(pattern, op_name):
      return kind
  return "other (aten)"


def profile(call, steps: int) -> tuple[collections.Counter, collections.Counter, collections.Counter, float]:
  """(self ms, calls, kernel calls per step by event name, wall ms per step) over `steps` calls.

  A kernel call has no aten child of its own kind: of conv2d -> convolution -> _convolution ->
  mkldnn_convolution (-> empty) only the last conv counts, the counterpart of one of our thunks;
  the wrappers above it still add their dispatch time to the kind."""
  from torch.profiler import ProfilerActivity, profile as torch_profile  # pylint: disable=g-import-not-at-top
  call()  # warm-up: oneDNN primitive caches, allocator, optimizer state
  with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      call()
    wall = (time.perf_counter() - start) / steps * 1e3
  ms, calls, kernels = collections.Counter(), collections.Counter(), collections.Counter()
  for event in prof.events():
    ms[event.name] += event.self_cpu_time_total / steps / 1e3  # microseconds in, ms per step out
    calls[event.name] += 1 / steps
    kind = kind_of(event.name)
    kernels[event.name] += 0 if any(kind_of(c.name) == kind for c in event.cpu_children) else 1 / steps
  return ms, calls, kernels, wall


def main() -> None:
  from benchmarks import common, xla_flags  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="unet", choices=("unet", "fpn"))
  parser.add_argument("--batch", type=int, default=0, help=f"0: {xla_flags.DEFAULT_BATCH}")
  parser.add_argument("--size", type=int, default=256, help="the FPN's input side")
  parser.add_argument("--steps", type=int, default=2, help="profiled calls (after one warm-up)")
  parser.add_argument("--top", type=int, default=12, help="most expensive aten ops to list by name")
  args = parser.parse_args()
  batch = args.batch or xla_flags.DEFAULT_BATCH[args.model]
  load = common.load_average()
  call = xla_flags.peer_call(args.model, xla_flags.peer_config(args.model, args.size), batch)
  import torch  # pylint: disable=g-import-not-at-top  (set up by peer_call)
  ms, calls, kernels, wall = profile(call, args.steps)
  total, ops = collections.Counter(), collections.Counter()
  for name in ms:
    total[kind_of(name)] += ms[name]
    ops[kind_of(name)] += kernels[name]
  whole = sum(total.values())
  print(f"- {xla_flags.PEER_NAME[args.model]} train step, batch {batch}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load {load} -> {common.load_average()}; "
        f"{whole:.1f} ms/step of self CPU time, {wall:.1f} ms/step wall (profiled)")
  if total[CONV_BWD]:
    print(f"- note: torch reports each convolution's backward as one op computing both gradients "
          f"({', '.join(n for n in ms if kind_of(n) == CONV_BWD)}), so its input and filter "
          f"gradients share the row '{CONV_BWD}'")
  print()
  print(common.markdown_table(["op kind", "ms / step", "share", "ops / step"],
                              [[kind, f"{t:.1f}", f"{100 * t / whole:.0f}%", f"{ops[kind]:.0f}"]
                               for kind, t in total.most_common()]))
  print()
  aten = collections.Counter({n: t for n, t in ms.items() if n.startswith("aten::")})
  print(common.markdown_table(["aten op", "kind", "ms / step", "calls / step"],
                              [[f"`{n}`", kind_of(n), f"{t:.1f}", f"{calls[n]:.0f}"]
                               for n, t in aten.most_common(args.top)]))


if __name__ == "__main__":
  main()
