"""Which generator settings learn the joint image-mask distribution best per CPU-minute.

Run from the repository root (about 5 minutes per variant on 2 cores at the default budget):

  python -m benchmarks.generator_levers --root=/tmp/levers --variants=base,self_cond,min_snr

Every variant is the demo config (configs/demo.py, the `cpu` preset) plus a few overrides
(VARIANTS; join names with "+" to combine them, e.g. self_cond+min_snr). All variants get the
same CPU budget: `--base_steps` steps of the base variant, and for the others as many steps
as cost the same FLOPs (XLA's cost analysis of each compiled train step; timings on a shared
2-core machine were too noisy to set budgets). Each variant then:

  1. trains G on the demo's prepared train split (shared by all variants),
  2. samples R x |D| pairs (sample.per_real = 2, no curation pool),
  3. is scored on val-free criteria of the pairs themselves:
       class TV     total variation between the set's class pixel shares and the real
                    train split's (0: same shares, 1: disjoint)
       fidelity     label fidelity mIoU: the metric encoder (a U-Net segmenter trained on
                    real train pairs, shared) segments the synthetic images, scored against
                    their generated masks
       FID, sFID    under the same metric encoder, against the real train images
  4. and by D'-only: an FPN segmenter trained on the synthetic pairs alone (500 steps),
     evaluated on the real val split (settings are chosen on val, never on test).

Prints a markdown table (benchmarks/RESULTS.md) and appends one JSON line per variant to
<root>/levers.jsonl, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

VARIANTS = {
    "base": {},
    "ss": {"diffusion.model.scale_shift": True},
    "self_cond": {"diffusion.self_condition": True},
    "min_snr": {"diffusion.loss_weighting": "min_snr"},
    "eps": {"diffusion.prediction": "eps"},
    "v": {"diffusion.prediction": "v"},
    "lr2e-3": {"diffusion.train.lr": 2e-3},
    "lr5e-4": {"diffusion.train.lr": 5e-4},
    "batch32": {"diffusion.train.batch_size": 32},
    "batch8": {"diffusion.train.batch_size": 8},
    "ch64": {"diffusion.model.ch": 64},
    "blocks2": {"diffusion.model.num_res_blocks": 2},
    "no_attn": {"diffusion.model.attn_resolutions": ()},
    "ema999": {"diffusion.train.ema_decay": 0.999},
    "presence": {"diffusion.condition": "presence", "sample.presence": "real"},
    "ddim50": {"sample.ddim_steps": 50},
    "ddpm": {"sample.sampler": "ddpm"},
}
SAMPLE_ONLY = ("sample.",)  # variants that change only these keys reuse the trained G of their base
D_PRIME_STEPS = 500
PER_REAL = 2


def overrides_of(name: str) -> dict:
  out = {}
  for part in name.split("+"):
    if part not in VARIANTS:
      raise SystemExit(f"unknown variant {part!r}; known: {', '.join(VARIANTS)}")
    out.update(VARIANTS[part])
  return out


def trained_by(name: str) -> str:
  """The variant whose G `name` samples from: itself, less the parts that change only sampling."""
  parts = [p for p in name.split("+") if not all(k.startswith(SAMPLE_ONLY) for k in VARIANTS[p])]
  return "+".join(parts) or "base"


def variant_config(name: str, steps: int | None = None):
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.curation.enabled = False
  config.sample.per_real = PER_REAL
  config.diffusion.train.sample_every = 0
  config.update_from_flattened_dict(overrides_of(name))
  if steps is not None:
    t = config.diffusion.train
    t.num_steps, t.checkpoint_every = steps, steps
  return config


def _step_flops(config) -> float:
  """XLA's FLOP count of one compiled train step of G under `config`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from satsynth_jax import generator, resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import parallel  # pylint: disable=g-import-not-at-top
  from satsynth_jax.train import diffusion  # pylint: disable=g-import-not-at-top

  t, d = config.diffusion.train, config.data
  setup = common.task_setup(diffusion.make_task(config, "unused-workdir", parallel.make_mesh()), t.batch_size,
                            config.seed)
  rng = np.random.default_rng(0)
  batch = {"x": rng.uniform(-1, 1, (t.batch_size, d.image_size, d.image_size,
                                    generator.joint_channels(config))).astype(np.float32)}
  if resolved.conditioned(config):
    batch["presence"] = rng.integers(0, 2, (t.batch_size, d.num_classes)).astype(np.float32)
  with jax.set_mesh(setup.mesh):
    compiled, _ = common.compile_jax(setup.step, setup.state, jax.device_put(batch, setup.batched))
  return common.xla_flops(compiled)


def relative_costs(names: list[str]) -> dict[str, float]:
  """Each variant's train-step FLOPs over the base's (XLA's cost analysis: deterministic, unlike timings on a
  shared machine). Self-conditioning's extra forward pass runs on half of the steps, but XLA counts both
  branches of its lax.cond, so half of that pass is added to the step without it."""
  def cost(name):
    config = variant_config(name)
    if not config.diffusion.self_condition:
      return _step_flops(config)
    with_pass = _step_flops(config)
    config.diffusion.self_condition = False
    without = _step_flops(config)
    return without + 0.5 * (with_pass - without)

  base = cost("base")
  return {name: cost(name) / base for name in names}


def _link(target: pathlib.Path, link: pathlib.Path) -> None:
  link.parent.mkdir(parents=True, exist_ok=True)
  if not link.exists():
    os.symlink(target, link)


def shared_inputs(root: pathlib.Path) -> None:
  """The demo's prepared splits and the metric encoder, made once under root."""
  from satsynth_jax.jobs import prepare, train_metric_encoder  # pylint: disable=g-import-not-at-top
  config = variant_config("base")
  if not (root / "data" / "val" / "manifest.json").exists():
    prepare.run(config, root)
  if not (root / "checkpoints" / "metric_encoder").exists():
    train_metric_encoder.run(config, root)


def class_tv(workdir: pathlib.Path, set_dir: pathlib.Path) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from satsynth_jax.data import records  # pylint: disable=g-import-not-at-top
  real = np.asarray(records.read_manifest(workdir / "data" / "train")["class_pixels"], np.float64)
  synthetic = np.asarray(records.read_manifest(set_dir)["class_pixels"], np.float64)
  return float(0.5 * np.abs(real / real.sum() - synthetic / synthetic.sum()).sum())


def measure(root: pathlib.Path, name: str, steps: int) -> dict:
  """Train (or reuse), sample and score one variant in root/<name>; returns its row."""
  from satsynth_jax import resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.jobs import (evaluate, sample, sample_quality, train_diffusion,  # pylint: disable=g-import-not-at-top
                                 train_segmentation)

  config = variant_config(name, steps)
  workdir = root / name
  _link(root / "data", workdir / "data")
  _link(root / "checkpoints" / "metric_encoder", workdir / "checkpoints" / "metric_encoder")
  if trained_by(name) != name:  # a sampler variant: the G of the variant it samples from
    run_name = resolved.g_run(config)
    _link(root / trained_by(name) / "checkpoints" / run_name, workdir / "checkpoints" / run_name)
  started = time.perf_counter()
  train_diffusion.run(config, workdir)
  train_seconds = time.perf_counter() - started
  started = time.perf_counter()
  sample.run(config, workdir)
  sample_seconds = time.perf_counter() - started
  set_dir = resolved.synthetic_dir(config, workdir)
  quality = sample_quality.run_for(config, workdir, set_dir, resolved.synthetic_set(config))
  seg = config.copy_and_resolve_references()
  seg.data.synthetic_fraction = 1.0
  seg.segmentation.train.num_steps = D_PRIME_STEPS
  seg.segmentation.eval_every = 0
  run = resolved.SegmenterRun.arm(seg, PER_REAL, seg.seed, resolved.synthetic_set(seg))
  train_segmentation.train_run(seg, workdir, run, set_dir)
  scores = evaluate.evaluate_run(seg, workdir, run)
  return {"variant": name, "steps": steps, "train_seconds": round(train_seconds, 1),
          "sample_seconds": round(sample_seconds, 1), "class_tv": round(class_tv(workdir, set_dir), 4),
          "fidelity_miou": quality["label_fidelity_miou"], "fid": quality["fid"], "sfid": quality["sfid"],
          "d_prime_val_miou": scores["val"]["miou"]}


def table(rows: list[dict]) -> str:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  header = ["variant", "G steps", "train s", "class TV", "fidelity mIoU %", "FID", "sFID", "D'-only val mIoU %"]
  body = [[r["variant"], r["steps"], r["train_seconds"], f"{r['class_tv']:.3f}",
           f"{100 * (r['fidelity_miou'] or 0):.1f}", f"{r['fid']:.1f}", f"{r['sfid']:.2f}",
           f"{100 * r['d_prime_val_miou']:.1f}"] for r in rows]
  return common.markdown_table(header, body)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--variants", default="base,self_cond,min_snr,v")
  parser.add_argument("--base_steps", type=int, default=1200, help="the CPU budget, in steps of the base variant")
  args = parser.parse_args()

  from satsynth_jax.infra import host_devices  # pylint: disable=g-import-not-at-top
  host_devices.configure()  # the CLI's CPU flags, before JAX starts

  names = args.variants.split(",")
  root = args.root.absolute()
  root.mkdir(parents=True, exist_ok=True)
  shared_inputs(root)
  trained = sorted({trained_by(n) for n in names} - {"base"})
  costs = relative_costs(trained) if trained else {}
  print(f"train step FLOPs over base: {costs}", flush=True)
  rows = []
  log = root / "levers.jsonl"
  for name in names:
    cost = costs.get(trained_by(name), 1.0)
    steps = 50 * max(1, round(args.base_steps / cost / 50))
    row = measure(root, name, steps) | {"relative_step_cost": round(cost, 3)}
    rows.append(row)
    with open(log, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(table(rows), flush=True)


if __name__ == "__main__":
  main()
