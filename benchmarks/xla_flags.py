"""XLA:CPU flag search for the train steps: G's U-Net and the FPN segmenter under each flag set.

Run from the repository root; by default every run is pinned to one core (`taskset -c 0`):

  python -m benchmarks.xla_flags --models=unet,fpn --rounds=2
  python -m benchmarks.xla_flags --profile=unet --flags=default   # where the step's time goes

Each (model, flag set) runs in its own subprocess (XLA reads XLA_FLAGS once per process), and
the runs alternate: round 1 runs every set once, round 2 again, ...; each set's best run counts,
as in common.time_interleaved. The PyTorch peers (diffusers' UNet2DModel, smp's FPN) run in the
same rotation when installed. A persistent compilation cache (keyed on the flags too) keeps
later rounds from compiling again. Prints a markdown table of img/s, the ratio to the default
flags and to the peer.

`--profile` traces two train steps with `--xla_cpu_enable_xprof_traceme` and sums each XLA
thunk's time by the kind of HLO it runs (forward / backward-input / backward-filter
convolutions, dots, reductions, elementwise fusions, copies), read from the compiled HLO.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

ONE_CORE = ("taskset", "-c", "0")
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
# (name, XLA_FLAGS, pinned to one core, batch override): the options this jaxlib has
# (strings in libjax_common.so; values from xla/debug_options_flags.cc).
FLAG_SETS = (
    ("default", "", True, 0),
    ("YNNPACK off (Eigen convs and dots)", YNN_OFF, True, 0),
    ("YNNPACK without convs", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", True, 0),
    ("YNNPACK without convs, LLVM -O1",
     "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution --xla_backend_optimization_level=1", True, 0),
    ("YNNPACK + eltwise fusions", "--xla_cpu_experimental_ynn_fusion_type=+eltwise", True, 0),
    ("oneDNN (YNNPACK off)", f"--xla_cpu_use_onednn=true {YNN_OFF}", True, 0),
    ("oneDNN fusions dot,eltwise (YNNPACK off)",
     f"--xla_cpu_experimental_onednn_fusion_type=dot,eltwise {YNN_OFF}", True, 0),
    ("XNNPACK convs and dots (YNNPACK off)",
     f"--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=individual_convolution,individual_dot "
     f"{YNN_OFF}", True, 0),
    ("XNNPACK graph fusion greedy", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
     True, 0),
    ("fast math", "--xla_cpu_enable_fast_math=true", True, 0),
    ("no fusion emitters", "--xla_cpu_use_fusion_emitters=false", True, 0),
    ("concurrency-optimized scheduler off", "--xla_cpu_enable_concurrency_optimized_scheduler=false", True, 0),
    ("multi-thread Eigen off", "--xla_cpu_multi_thread_eigen=false", True, 0),
    ("thunk runtime off", "--xla_cpu_use_thunk_runtime=false", True, 0),
    ("default, half batch", "", True, -2),
    ("default, double batch", "", True, 2),
    ("2 cores, 1 device (not pinned)", "", False, 0),
    ("2 cores, 2 devices (not pinned)", "--xla_force_host_platform_device_count=2", False, 0),
)
PEER_NAME = {"unet": "diffusers UNet2DModel", "fpn": "smp FPN('resnet50')"}
DEFAULT_BATCH = {"unet": 16, "fpn": 2}
RESULT = "RESULT "


# ---------------------------------------------------------------- worker (inside the subprocess)

def build(model: str, batch: int, size: int):
  """(our compiled-train-step Program, FLOPs/img, the object holding it) for `model`."""
  from benchmarks import diffusion, segmentation  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo, isaid  # pylint: disable=g-import-not-at-top
  if model == "unet":
    config = demo.get_config()
    config.dtype = "float32"
    ours = diffusion.JaxUNet(config, batch)
  else:
    config = isaid.get_config()
    config.dtype = "float32"
    config.data.image_size = size
    ours = segmentation.JaxFPN(config, batch)
  program, flops = ours.train_program()
  return program, flops, ours, config


def peer_config(model: str, size: int):
  """The peer's config: the demo's for G (at its own size), iSAID's for the FPN at `size`."""
  from satsynth_jax.configs import demo, isaid  # pylint: disable=g-import-not-at-top
  config = demo.get_config() if model == "unet" else isaid.get_config()
  if model == "fpn":
    config.data.image_size = size
  return config


def peer_call(model: str, config, batch: int):
  """The PyTorch peer's train step on the same batch."""
  from benchmarks import common, diffusion, segmentation  # pylint: disable=g-import-not-at-top
  torch, device = common.setup_torch()
  if model == "unet":
    return diffusion.DiffusersUNet(config, batch, "float32", torch, device).train_call()
  return segmentation.SmpFPN(config, batch, "float32", torch, device).train_call()[0]


def worker(args) -> dict:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if args.side == "peer":
    call, compile_s = peer_call(args.model, peer_config(args.model, args.size), args.batch), 0.0
  else:
    program, _, _, _ = build(args.model, args.batch, args.size)
    call, compile_s = program.call, program.compile_seconds
  seconds = common.time_interleaved([call], args.steps)[0]
  return {"img_s": args.batch / seconds, "compile_s": compile_s, "devices": jax.device_count(),
          "threads": common.host_threads(), "load": common.load_average()}


# ---------------------------------------------------------------- profile (inside the process)

def hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind, for the instructions the CPU runtime runs as thunks.

  A fusion's kind comes from its fused computation: a convolution, a dot, a reduce, else
  elementwise. Convolutions are split by what jax's autodiff made them: an output laid out
  spatial-first (`->01..`) is a filter gradient; one under `transpose(` in op_name with an
  activation-layout output is an input gradient; the rest are forward.
  """
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  kinds = {}
  for lines in bodies.values():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
      if not m:
        continue
      name, opcode = m.groups()
      called = re.search(r"calls=%?([\w.\-]+)", line)
      body = "\n".join(bodies.get(called.group(1), [])) if called else line
      kinds[name] = classify(opcode, body, line)
  return kinds


def classify(opcode: str, body: str, line: str) -> str:
  conv = re.search(r".*convolution\(.*", body)
  if conv:
    return conv_kind(conv.group(0))
  if " dot(" in body or opcode == "dot":
    return "dot (attention, dense)"
  if "reduce(" in body or "reduce-window(" in body:
    return "reduction (norm statistics, sums)"
  if opcode in ("copy", "transpose") or (opcode == "fusion" and re.search(r"\b(copy|transpose)\(", body) and
                                         not re.search(r"\b(add|multiply|subtract|divide|exponential|tanh)\(", body)):
    return "copy / transpose"
  return "elementwise fusion" if opcode == "fusion" else f"other ({opcode})"


def conv_kind(line: str) -> str:
  """XLA:CPU lays every convolution out as b01f_01io->b01f, so autodiff's two transposes are told
  apart by shape: a filter gradient's window is the activation (wider than the kernel) and its
  output is kernel-sized; an input gradient is a transpose(...) op with a kernel-sized window."""
  window = re.search(r"window=\{size=(\d+)x(\d+)", line)
  if window and int(window.group(1)) > 7:  # kernels here are 1x1 or 3x3
    return "conv backward-filter"
  return "conv backward-input" if "transpose(" in line else "conv forward"


def profile(args) -> list[list[object]]:
  """Rows (kind, ms per step, share, thunks) for one train step under the current XLA_FLAGS."""
  import jax  # pylint: disable=g-import-not-at-top
  program, _, ours, _ = build(args.model, args.batch, args.size)
  kinds = hlo_kinds(ours.train_compiled.as_text())
  program.call()
  steps, trace_dir = 2, tempfile.mkdtemp(prefix="xla_profile_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    program.call()
  jax.profiler.stop_trace()
  data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
  total, count = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue  # host-side dispatch; the thunks run on XLA's threads
      for event in line.events:
        kind = kinds.get(event.name)
        if kind:
          total[kind] += event.duration_ns / steps / 1e6
          count[kind] += 1
  whole = sum(total.values())
  return [[kind, f"{ms:.1f}", f"{100 * ms / whole:.0f}%", count[kind] // steps] for kind, ms in total.most_common()]


def conv_micro(batch: int = 16, side: int = 32, channels: int = 64, repeats: int = 5) -> list[list[object]]:
  """ms of one 3x3 SAME convolution and of its two autodiff transposes, alone, under the current XLA_FLAGS:
  isolates the kernels the profile names, so a flag's effect on each shows in seconds."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((batch, side, side, channels))
  w = jnp.ones((3, 3, channels, channels)) * 0.01
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  programs = {"forward": jax.jit(conv),
              "backward-input": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
              "backward-filter": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])}
  flops = 2 * batch * side * side * channels * channels * 9
  rows = []
  for name, f in programs.items():
    args = (x, w) if name == "forward" else (x, w, x)
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      f(*args).block_until_ready()
      best = min(best, time.perf_counter() - start)
    rows.append([name, f"{1e3 * best:.1f}", f"{flops / best / 1e9:.0f}"])
  return rows


# ---------------------------------------------------------------- driver

def run_subprocess(model: str, side: str, flags: str, pinned: bool, batch: int, args) -> dict | str:
  """One worker run; its result dict, or why it failed."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_COMPILATION_CACHE_DIR=args.cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
  cmd = [*(ONE_CORE if pinned else ()), sys.executable, "-m", "benchmarks.xla_flags", "--worker", side,
         f"--models={model}", f"--batch={batch}", f"--size={args.size}", f"--steps={args.steps}"]
  try:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
  except subprocess.TimeoutExpired:
    return f"timed out after {args.timeout} s"
  for line in done.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  return f"failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:] or ''}"


def batch_for(model: str, change: int, args) -> int:
  base = args.batch or DEFAULT_BATCH[model]
  return base if change == 0 else (base * change if change > 0 else max(1, base // -change))


def search(args, models: list[str], sets, peer: bool) -> dict:
  """{(model, set name or 'peer'): best result or failure}, running every entry once per round."""
  best: dict = {}
  plan = [(m, name, flags, pinned, batch_for(m, change, args)) for m in models
          for name, flags, pinned, change in sets]
  plan += [(m, "peer", "", True, batch_for(m, 0, args)) for m in models if peer]
  for r in range(args.rounds):
    for model, name, flags, pinned, batch in plan:
      result = run_subprocess(model, "peer" if name == "peer" else "ours", flags, pinned, batch, args)
      key, old = (model, name), best.get((model, name))
      print(f"round {r + 1} {model} {name}: {result}", file=sys.stderr, flush=True)
      if isinstance(result, dict) and (not isinstance(old, dict) or result["img_s"] > old["img_s"]):
        best[key] = result
      elif old is None:
        best[key] = result
  return best


def table(best: dict, models: list[str], sets) -> str:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  for model in models:
    default, peer = best.get((model, "default")), best.get((model, "peer"))
    ok = lambda r: isinstance(r, dict)
    for name, flags, pinned, _ in (*sets, ("peer", "", True, 0)):
      r = best.get((model, name))
      if r is None:
        continue
      label = PEER_NAME[model] if name == "peer" else name
      if not ok(r):
        rows.append([model, label, f"`{flags}`" if flags else "", "-", "-", "-", "-", r])
        continue
      rows.append([model, label, f"`{flags}`" if flags else "", "1 core" if pinned else "2 cores",
                   common.fmt(r["img_s"]), common.fmt(r["img_s"] / default["img_s"]) if ok(default) else "-",
                   common.fmt(r["img_s"] / peer["img_s"]) if ok(peer) and name != "peer" else "-",
                   f"compile {r['compile_s']:.0f} s, {r['devices']} device(s), load {r['load']}"])
  return common.markdown_table(
      ["model", "flag set", "XLA_FLAGS", "cores", "img/s", "/ default", "/ peer", "notes"], rows)


def peer_available() -> bool:
  try:
    import diffusers  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="unet,fpn", help="comma-separated: unet (demo G), fpn (FPN-ResNet50)")
  parser.add_argument("--flags", default="", help="comma-separated flag-set names (prefixes) to run; empty: all")
  parser.add_argument("--batch", type=int, default=0, help=f"0: {DEFAULT_BATCH}")
  parser.add_argument("--size", type=int, default=256, help="the FPN's input side")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per run (after one warm-up)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
  parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "satsynth_xla_flags_cache"))
  parser.add_argument("--profile", default="", help="profile this model's train step in this process instead")
  parser.add_argument("--conv", action="store_true", help="time one conv and its two gradients alone instead")
  parser.add_argument("--worker", default="", choices=("", "ours", "peer"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  models = [m for m in args.models.split(",") if m]
  if args.worker:
    args.side, args.model = args.worker, models[0]
    print(RESULT + json.dumps(worker(args)), flush=True)
    return
  if args.conv:
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    print(f"- XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {common.host_threads()} thread(s), "
          f"load {common.load_average()}\n")
    print(common.markdown_table(["3x3 conv [16,32,32,64] -> 64", "ms", "GFLOP/s"], conv_micro()))
    return
  if args.profile:  # thunk trace events need this before XLA starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    args.model, args.batch = args.profile, args.batch or DEFAULT_BATCH[args.profile]
    load = common.load_average()
    rows = profile(args)
    print(f"- {args.profile} train step, batch {args.batch}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"{common.host_threads()} thread(s), load {load} -> {common.load_average()}\n")
    print(common.markdown_table(["HLO kind", "ms / step", "share", "thunks / step"], rows))
    return
  wanted = [w.strip() for w in args.flags.split(",") if w.strip()]
  sets = [s for s in FLAG_SETS if s[0] == "default" or not wanted or any(s[0].startswith(w) for w in wanted)]
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  load = common.load_average()
  best = search(args, models, sets, args.peer and peer_available())
  print(f"- {common.cpu_model()}; load average {load} at the start, {common.load_average()} at the end\n")
  print(table(best, models, sets))


if __name__ == "__main__":
  main()
