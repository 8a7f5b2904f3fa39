"""--mode=pipeline: the paper's experiment as one resumable command.

prepare -> train_diffusion -> sample -> train_metric_encoder -> evaluate_samples (FID, sFID,
IS, label fidelity) -> [image-only baseline: train, sample, evaluate_samples, when
pipeline.image_only_baseline] -> train_segmentation (R=0 and R=sample.per_real) -> evaluate
both -> report/summary.md. Each stage knows when its outputs are complete, so
re-running after an interruption skips finished stages; unfinished ones resume from their
own checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable

import jax

from satsynth_jax import atomic, checkpoint, evaluate, parallel, sample, sample_quality
from satsynth_jax.data import prepare, records
from satsynth_jax.train import diffusion, segmentation


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  done: Callable[[], bool]
  run: Callable[[], object]


def _image_only(config):
  config = copy.deepcopy(config)
  config.diffusion.joint_labels = False
  return config


def _with_ratio(config, ratio: int):
  config = copy.deepcopy(config)
  config.data.synthetic_ratio = ratio
  return config


def _trained(workdir: str, model: str, num_steps: int) -> bool:
  step = checkpoint.latest_step(checkpoint.checkpoint_dir(workdir, model))
  return step is not None and step >= num_steps


def _eval_path(workdir: str, config) -> str:
  return os.path.join(workdir, "metrics", f"eval_{segmentation.run_name(config)}.json")


def _evaluated(workdir: str, config) -> bool:
  """An eval JSON exists for the run's latest checkpoint."""
  path = _eval_path(workdir, config)
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    scored_step = json.load(f)["checkpoint_step"]
  return scored_step == checkpoint.latest_step(checkpoint.checkpoint_dir(workdir, segmentation.run_name(config)))


def _sampled(config, workdir: str) -> bool:
  try:
    manifest = records.read_manifest(sample.synthetic_dir(workdir, config.diffusion.joint_labels))
    real = records.read_manifest(os.path.join(workdir, "data", "train"))
  except records.RecordError:
    return False
  return manifest["num_examples"] == config.sample.per_real * real["num_examples"]


def _quality_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "metrics", f"{sample_quality.output_name(name)}.json")


def _scored(workdir: str, synthetic: str, name: str) -> bool:
  """A sample-quality JSON exists for the finished synthetic set, under the current encoder."""
  path = _quality_path(workdir, name)
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    scores = json.load(f)
  encoder_step = checkpoint.latest_step(checkpoint.checkpoint_dir(workdir, sample_quality.METRIC_ENCODER))
  return (scores["num_synthetic"] == records.read_manifest(synthetic)["num_examples"]
          and scores["metric_encoder"].startswith(f"{sample_quality.METRIC_ENCODER}@{encoder_step}:"))


def _prepared(workdir: str) -> bool:
  try:
    for split in ("train", "val"):
      records.read_manifest(os.path.join(workdir, "data", split))
  except records.RecordError:
    return False
  return True


def _prepare_once(config, workdir: str) -> None:
  """Records are written by process 0 alone; the others wait for them."""
  if jax.process_index() == 0:
    prepare.run(config, workdir)
  parallel.barrier("prepare")


def stages(config, workdir: str) -> list[Stage]:
  ratio = config.sample.per_real
  runs = [_with_ratio(config, 0), _with_ratio(config, ratio)]
  out = [
      Stage("prepare", lambda: _prepared(workdir), functools.partial(_prepare_once, config, workdir)),
      Stage("train_diffusion", lambda: _trained(workdir, diffusion.model_name(config), config.train.num_steps),
            lambda: diffusion.run(config, workdir)),
      Stage("sample", lambda: _sampled(config, workdir), lambda: sample.run(config, workdir)),
      Stage("train_metric_encoder",
            functools.partial(_trained, workdir, sample_quality.METRIC_ENCODER, config.segmentation.train.num_steps),
            functools.partial(sample_quality.train_metric_encoder, config, workdir)),
      Stage("evaluate_samples", functools.partial(_scored, workdir, sample.synthetic_dir(workdir), ""),
            functools.partial(sample_quality.run, config, workdir)),
  ]
  if config.pipeline.image_only_baseline:
    image_only = _image_only(config)
    synthetic = sample.synthetic_dir(workdir, joint_labels=False)
    out += [
        Stage("train_diffusion image_only",
              lambda: _trained(workdir, diffusion.model_name(image_only), image_only.train.num_steps),
              lambda: diffusion.run(image_only, workdir)),
        Stage("sample image_only", lambda: _sampled(image_only, workdir), lambda: sample.run(image_only, workdir)),
        Stage("evaluate_samples image_only", functools.partial(_scored, workdir, synthetic, "image_only"),
              functools.partial(sample_quality.run_for, config, workdir, synthetic, "image_only")),
    ]
  for run_config in runs:
    name = segmentation.run_name(run_config)
    out.append(Stage(f"train_segmentation {name}",
                     functools.partial(_trained, workdir, name, run_config.segmentation.train.num_steps),
                     functools.partial(segmentation.run, run_config, workdir)))
    out.append(Stage(f"evaluate {name}", functools.partial(_evaluated, workdir, run_config),
                     functools.partial(evaluate.run, run_config, workdir)))
  return out


def _format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _percent(value) -> str:
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def summary_markdown(config, workdir: str) -> str:
  """The R=0 vs R>0 table from the eval JSONs, with per-class IoU."""
  rows = []
  for ratio in (0, config.sample.per_real):
    with open(_eval_path(workdir, _with_ratio(config, ratio)), encoding="utf-8") as f:
      rows.append(json.load(f))
  names = list(config.data.class_names)
  lines = [
      f"# SatSynth experiment: {config.data.format}, {config.segmentation.model.upper()} segmenter",
      "",
      f"Generator: {config.train.num_steps} steps; {config.sample.per_real} synthetic pair(s) per real pair "
      f"({config.sample.sampler}); segmenter: {config.segmentation.train.num_steps} steps at "
      f"{config.data.image_size}px; scores on the val split (%).",
      "",
      "| train on | R | mIoU | mF1 | mIoU w/o bg | " + " | ".join(f"IoU {n}" for n in names) + " |",
      "|---|---|---|---|---|" + "---|" * len(names),
  ]
  for row in rows:
    s = row["scores"]
    label = "D" if row["synthetic_ratio"] == 0 else "D u D'"
    lines.append(f"| {label} | {row['synthetic_ratio']} | {_percent(s['miou'])} | {_percent(s['mf1'])} | "
                 f"{_percent(s.get('miou_no_background'))} | "
                 + " | ".join(_percent(s.get(f"iou/{n}")) for n in names) + " |")
  lines += ["", "Sample quality (features of the metric encoder, a U-Net segmenter trained on the real train",
            "split; compare numbers only under the same encoder id):", "",
            "| samples | FID | sFID | IS | label fidelity mIoU (%) | metric encoder |", "|---|---|---|---|---|---|"]
  for name, label in (("", "joint image + mask (SatSynth)"), ("image_only", "image only (DDPM baseline)")):
    path = _quality_path(workdir, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        q = json.load(f)
      lines.append(f"| {label} | {q['fid']:.3f} | {q['sfid']:.3f} | {q['is']['mean']:.3f} | "
                   f"{_percent(q['label_fidelity_miou'])} | `{q['metric_encoder']}` |")
  lines += ["", "Pictures: `report/eval_*.png` (predictions), `samples/synthetic_grid.png`,",
            "`report/class_frequency_real_vs_synthetic.png`, `report/prepare_*.png`.", ""]
  return "\n".join(lines)


def run(config, workdir: str) -> None:
  plan = stages(config, workdir)
  is_writer = jax.process_index() == 0
  started = time.time()
  for i, stage in enumerate(plan, 1):
    prefix = f"[pipeline {i}/{len(plan)}] {stage.name}"
    if stage.done():
      print(f"{prefix}: complete, skipped", flush=True)
      continue
    print(f"{prefix}: running", flush=True)
    t0 = time.time()
    stage.run()
    print(f"{prefix}: done in {_format_seconds(time.time() - t0)}", flush=True)
  if is_writer:
    text = summary_markdown(config, workdir)
    path = atomic.write_bytes(os.path.join(workdir, "report", "summary.md"), text.encode())
    print(f"\n{text}\n[pipeline] finished in {_format_seconds(time.time() - started)}; wrote {path}", flush=True)
