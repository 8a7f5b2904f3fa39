"""`--mode=experiment`: the paper's experiment as one resumable command.

prepare -> train_diffusion -> [train_sr, with sample.super_resolve] -> sample ->
train_metric_encoder -> evaluate_samples (FID, sFID, IS, label fidelity) -> [image-only
baseline: train, sample, evaluate_samples, when experiment.image_only_baseline] -> for each arm
(D: R=0; D u D': R=sample.per_real) and each of experiment.seeds seeds: train_segmentation,
evaluate -> report/summary.md.

Each stage knows when its outputs are complete *and were made with this config's settings*
(identity.py): re-running after an interruption skips finished stages, unfinished ones
resume from their own checkpoints, and a stage whose output was made under other settings
stops the experiment with one line rather than being skipped. Ablations (x0, one-hot,
image-only) get their own run names, so they run beside the baseline in one workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import time
from typing import Callable

import jax

from satsynth_jax import (atomic, checkpoint, curate, evaluate, generator, identity, parallel, report, sample,
                          sample_quality, segmenter, viz, workdir as layout)
from satsynth_jax.data import prepare, records
from satsynth_jax.train import diffusion, metric_encoder, segmentation, super_resolution


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  done: Callable[[], bool]
  run: Callable[[], object]


@dataclasses.dataclass(frozen=True)
class Arm:
  """One column group of the comparison: a training set (D, or D u D') over the experiment's seeds."""
  label: str
  synthetic_ratio: int
  runs: tuple[segmenter.Run, ...]
  synthetic_dir: str | None


def ratios(config) -> tuple[int, ...]:
  """The R of each D u D' arm: experiment.ratios, or just sample.per_real."""
  return tuple(config.experiment.ratios) or (config.sample.per_real,)


def arms(config, workdir) -> list[Arm]:
  """D (real only), D u D' for each R (the set's first R x |D| pairs) and, with curation, D u D'_curated
  at R = sample.per_real; each trained once per seed."""
  seeds = [config.seed + i for i in range(config.experiment.seeds)]

  def arm(ratio, name, directory):
    return Arm("D" if ratio == 0 else "D u D'", ratio,
               tuple(segmenter.Run.arm(config, ratio, seed, name) for seed in seeds),
               directory and os.fspath(directory))

  out = [arm(0, None, None)]
  out += [arm(r, generator.synthetic_set(config), generator.synthetic_dir(config, workdir)) for r in ratios(config)]
  if config.curation.enabled:
    out.append(arm(config.sample.per_real, curate.curated_set(config), curate.curated_dir(config, workdir)))
  return out


REMEDY = "use another --workdir, or delete that folder to redo the stage with this config"


def _trained(workdir, run: str, num_steps: int, shaping: Callable[[], dict]) -> bool:
  """The run reached num_steps under this config's shaping settings (a mismatch is refused)."""
  directory = layout.checkpoint_dir(workdir, run)
  step = checkpoint.latest_step(directory)
  if step is None:
    return False
  identity.check(directory, shaping(), f"run {run!r}", REMEDY)
  return step >= num_steps


def _set_identity(directory) -> dict | None:
  recorded = identity.read(directory)
  return recorded["shaping"] if recorded else None


def _evaluated(workdir, run: segmenter.Run) -> bool:
  """An eval JSON exists for the run's latest checkpoint."""
  path = evaluate.eval_path(workdir, run)
  if not path.exists():
    return False
  with open(path, encoding="utf-8") as f:
    scored_step = json.load(f)["checkpoint_step"]
  return scored_step == checkpoint.latest_step(layout.checkpoint_dir(workdir, run.name))


def _sampled(config, workdir) -> bool:
  """The set holds R x |D| pairs drawn from the current G (and G_SR) with this config's sampler."""
  out_dir = layout.synthetic_dir(workdir, generator.synthetic_set(config))
  try:
    manifest = records.read_manifest(out_dir)
    real = records.read_manifest(layout.data_dir(workdir, "train"))
  except records.RecordError:
    return False
  g_run = generator.g_run(config)
  step = checkpoint.latest_step(layout.checkpoint_dir(workdir, g_run))
  sr_step = (checkpoint.latest_step(layout.checkpoint_dir(workdir, generator.sr_run(config)))
             if config.sample.super_resolve else None)
  sr_config = (generator.trained_config(config, workdir, generator.sr_run(config)) if config.sample.super_resolve
               else None)
  expected = sample.plan(config, generator.trained_config(config, workdir, g_run), real["num_examples"], step, sr_step,
                         sr_config)
  identity.check(out_dir, expected, "this synthetic set", REMEDY)
  return manifest["num_examples"] == expected["requested"]


def _scored(workdir, synthetic, name: str) -> bool:
  """A sample-quality JSON exists for the finished synthetic set, under the current encoder."""
  path = layout.metrics_path(workdir, sample_quality.output_name(name))
  if not path.exists():
    return False
  with open(path, encoding="utf-8") as f:
    scores = json.load(f)
  encoder_step = checkpoint.latest_step(layout.checkpoint_dir(workdir, segmenter.METRIC_ENCODER))
  return (scores["num_synthetic"] == records.read_manifest(synthetic)["num_examples"]
          and scores["metric_encoder"].startswith(f"{segmenter.METRIC_ENCODER}@{encoder_step}:"))


def _prepared(workdir) -> bool:
  try:
    for split in layout.SPLITS:
      records.read_manifest(layout.data_dir(workdir, split))
  except records.RecordError:
    return False
  return True


def _prepare_once(config, workdir) -> None:
  """Records are written by process 0 alone; the others wait for them."""
  if jax.process_index() == 0:
    prepare.run(config, workdir)
  parallel.barrier("prepare")


def _generator_stages(config, workdir, label: str = "") -> tuple[list[Stage], object]:
  """Train G (and G_SR for the cascade), sample its set, score the set."""
  suffix = f" {label}" if label else ""
  synthetic = layout.synthetic_dir(workdir, generator.synthetic_set(config))
  out = [Stage(f"train_diffusion{suffix}",
               functools.partial(_trained, workdir, generator.g_run(config), config.diffusion.train.num_steps,
                                 functools.partial(generator.g_shaping, config)),
               functools.partial(diffusion.run, config, workdir))]
  if config.sample.super_resolve:
    out.append(Stage(f"train_sr{suffix}",
                     functools.partial(_trained, workdir, generator.sr_run(config), config.sr.train.num_steps,
                                       functools.partial(generator.sr_shaping, config)),
                     functools.partial(super_resolution.run, config, workdir)))
  out.append(Stage(f"sample{suffix}", functools.partial(_sampled, config, workdir),
                   functools.partial(sample.run, config, workdir)))
  return out, synthetic


def stages(config, workdir) -> list[Stage]:
  encoder = segmenter.Run.metric_encoder(config)
  out = [Stage("prepare", functools.partial(_prepared, workdir), functools.partial(_prepare_once, config, workdir))]
  generator_stages, synthetic = _generator_stages(config, workdir)
  out += generator_stages
  out.append(Stage("train_metric_encoder",
                   functools.partial(_trained, workdir, encoder.name, config.segmentation.train.num_steps,
                                     functools.partial(segmenter.shaping, config, encoder, None)),
                   functools.partial(metric_encoder.run, config, workdir)))
  name = generator.synthetic_set(config)
  out.append(Stage("evaluate_samples", functools.partial(_scored, workdir, synthetic, name),
                   functools.partial(sample_quality.run_for, config, workdir, synthetic, name)))
  if config.experiment.image_only_baseline:
    image_only = config.copy_and_resolve_references()
    with image_only.unlocked():
      image_only.diffusion.joint_labels = False
    baseline_stages, baseline_set = _generator_stages(image_only, workdir, "image_only")
    baseline_name = generator.synthetic_set(image_only)
    out += baseline_stages
    out.append(Stage("evaluate_samples image_only", functools.partial(_scored, workdir, baseline_set, baseline_name),
                     functools.partial(sample_quality.run_for, config, workdir, baseline_set, baseline_name)))
  real_arm, *synthetic_arms = arms(config, workdir)
  out += _arm_stages(config, workdir, real_arm)  # first: the real-only run also scores curation's pool
  if config.curation.enabled:
    curated, curated_name = curate.curated_dir(config, workdir), curate.curated_set(config)
    out.append(Stage("curate", functools.partial(curate.is_curated, config, workdir, synthetic, curated),
                     functools.partial(curate.run, config, workdir)))
    out.append(Stage("evaluate_samples curated", functools.partial(_scored, workdir, curated, curated_name),
                     functools.partial(sample_quality.run_for, config, workdir, curated, curated_name)))
  for arm in synthetic_arms:
    out += _arm_stages(config, workdir, arm)
  return out


def _arm_stages(config, workdir, arm: Arm) -> list[Stage]:
  """Train and evaluate each seed's run of one arm."""
  out = []
  for run in arm.runs:
    def run_shaping(run=run):
      return segmenter.shaping(config, run, arm.synthetic_dir and _set_identity(arm.synthetic_dir))

    out.append(Stage(f"train_segmentation {run.name}",
                     functools.partial(_trained, workdir, run.name, config.segmentation.train.num_steps,
                                       run_shaping),
                     functools.partial(segmentation.train_run, config, workdir, run, arm.synthetic_dir)))
    out.append(Stage(f"evaluate {run.name}", functools.partial(_evaluated, workdir, run),
                     functools.partial(evaluate.evaluate_run, config, workdir, run)))
  return out


def _format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _read_json(path) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _arm_label(arm: Arm) -> str:
  return "D" if arm.synthetic_ratio == 0 else f"D u D' ({pathlib.Path(arm.synthetic_dir).name})"


def _other_runs(workdir, shown: set[str]) -> dict[str, tuple[int, list[dict]]]:
  """Eval JSONs of segmenter runs in this workdir that this config's arms do not cover (ablations
  run before with other settings), grouped over seeds: shown side by side in the summary."""
  groups: dict[str, tuple[int, list[dict]]] = {}
  for path in sorted(layout.metrics_dir(workdir).glob("eval_*.json")):
    row = _read_json(path)
    if row is None or row["run"] in shown:
      continue
    group = re.sub(r"_s\d+$", "", row["run"])
    groups.setdefault(group, (row["synthetic_ratio"], []))[1].append(row)
  return groups


def summary(config, workdir) -> str:
  """report/summary.md from the eval, sample-quality and stage-time JSONs of this workdir."""
  config_arms = arms(config, workdir)
  evals = {_arm_label(arm): (arm.synthetic_ratio, [_read_json(evaluate.eval_path(workdir, run)) for run in arm.runs])
           for arm in config_arms}
  others = _other_runs(workdir, {run.name for arm in config_arms for run in arm.runs})
  quality = {}
  for path in sorted(layout.metrics_dir(workdir).glob(f"{sample_quality.output_name('')}_*.json")):
    quality[f"`{path.stem.removeprefix(sample_quality.output_name('') + '_')}`"] = _read_json(path)
  times = _read_json(layout.metrics_path(workdir, STAGE_TIMES)) or {}
  return report.summary_markdown(config, evals, quality, times, others)


def _write_curves(config, workdir) -> None:
  """report/training_curves_<model>.png: the loss of every trained run against its step."""
  runs = {"generator": [generator.g_run(config)] + ([generator.sr_run(config)] if config.sample.super_resolve else []),
          "segmenters": [run.name for arm in arms(config, workdir) for run in arm.runs] + [segmenter.METRIC_ENCODER]}
  for kind, names in runs.items():
    logs = {name: report.read_jsonl(layout.metrics_path(workdir, name, ".jsonl")) for name in names}
    if any(logs.values()):
      viz.save_png(report.training_curves({k: v for k, v in logs.items() if v}, "loss", f"{kind}: training loss"),
                   layout.report_path(workdir, f"training_curves_{kind}.png"))


STAGE_TIMES = "experiment_stage_seconds"  # metrics/<this>.json: wall and compile time of each stage's last run


class _CompileClock:
  """Seconds this process spent tracing, lowering and compiling XLA programs (jax.monitoring events)."""

  seconds = 0.0
  _registered = False

  @classmethod
  def start(cls) -> None:
    if not cls._registered:  # listeners cannot be removed: register once per process
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      cls._registered = True

  @classmethod
  def _on_event(cls, event: str, duration: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
      cls.seconds += duration


def _record_time(workdir, stage: str, seconds: float, compile_seconds: float) -> None:
  path = layout.metrics_path(workdir, STAGE_TIMES)
  times = _read_json(path) or {}
  times[stage] = {"seconds": round(seconds, 1), "compile_seconds": round(compile_seconds, 1)}
  atomic.write_json(path, times)


def run(config, workdir) -> None:
  plan = stages(config, workdir)
  is_writer = jax.process_index() == 0
  started = time.time()
  _CompileClock.start()
  for i, stage in enumerate(plan, 1):
    prefix = f"[experiment {i}/{len(plan)}] {stage.name}"
    if stage.done():
      print(f"{prefix}: complete, skipped", flush=True)
      continue
    print(f"{prefix}: running", flush=True)
    t0, compiled = time.time(), _CompileClock.seconds
    stage.run()
    seconds, compile_seconds = time.time() - t0, _CompileClock.seconds - compiled
    if is_writer:
      _record_time(workdir, stage.name, seconds, compile_seconds)
    print(f"{prefix}: done in {_format_seconds(seconds)} (compiling {_format_seconds(compile_seconds)})", flush=True)
  if is_writer:
    _write_curves(config, workdir)
    text = summary(config, workdir)
    path = atomic.write_bytes(layout.report_path(workdir, "summary.md"), text.encode())
    print(f"\n{text}\n[experiment] finished in {_format_seconds(time.time() - started)}; wrote {path}", flush=True)
