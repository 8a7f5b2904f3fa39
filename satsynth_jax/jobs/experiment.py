"""`--mode=experiment`: the paper's experiment as one resumable command; it only orders the jobs.

prepare -> train_diffusion -> [train_sr, with sample.super_resolve] -> [train_metric_encoder, when
sample_quality.encoder or curation.scorer is the metric encoder] -> sample + evaluate_samples (FID,
sFID, IS, label fidelity) of each set the arms need -> [image-only baseline: train, sample,
evaluate_samples, when experiment.image_only_baseline] -> D's runs (R=0) -> [the sets' evaluate_samples
here instead, when their encoder is D's first run (real_only)] -> curate (+ evaluate_samples) -> the
other arms' runs; each run of each of experiment.seeds seeds: train_segmentation, evaluate ->
report/summary.md. Which sets and runs the arms use is resolved.py's (experiment_set, SegmenterRun).

Each stage asks its job whether its output is complete *and was made with this config's
settings* (the job's `is_complete`, infra/identity.py): re-running after an interruption skips
finished stages, unfinished ones resume from their own checkpoints, and a stage whose output was
made under other settings stops the experiment with one line rather than being skipped.
Ablations (x0, one-hot, image-only) get their own run names, so they run beside the baseline in
one workdir.
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

from satsynth_jax import resolved
from satsynth_jax.data import records
from satsynth_jax.infra import atomic, parallel, report, viz, workdir as layout
from satsynth_jax.jobs import (curate, evaluate, prepare, sample, sample_quality, train_diffusion, train_metric_encoder,
                               train_segmentation, train_sr)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  done: Callable[[], bool]  # the job's own answer: is its output complete for these settings?
  run: Callable[[], object]


@dataclasses.dataclass(frozen=True)
class Arm:
  """One column group of the comparison: a training set (D, or D u a synthetic set) over the experiment's seeds."""
  label: str
  synthetic_ratio: int
  runs: tuple[resolved.SegmenterRun, ...]
  synthetic_dir: str | None


def arms(config, workdir) -> list[Arm]:
  """D (real only), then experiment.arms: D u D' for each R (the unconditional set's first R x |D| pairs),
  D u D'_curated (curated from its pool), D u D'_conditioned (the conditioned set's first R x |D|) and
  D u D'_conditioned_curated, at R = sample.per_real; each trained once per seed."""
  seeds = [config.seed + i for i in range(config.experiment.seeds)]

  def arm(label, ratio, name=None, directory=None):
    return Arm(label, ratio, tuple(resolved.SegmenterRun.arm(config, ratio, seed, name) for seed in seeds),
               directory and os.fspath(directory))

  out = [arm("D", 0)]
  r = config.sample.per_real
  for kind in config.experiment.arms:
    sampled = resolved.experiment_set(config, conditioned=kind.startswith("conditioned"))
    name, directory = resolved.synthetic_set(sampled), resolved.synthetic_dir(sampled, workdir)
    label = "D u D'" + ("_conditioned" if kind.startswith("conditioned") else "")
    if kind.endswith("curated"):
      out.append(arm(f"{label}_curated", r, resolved.curated_set(sampled), resolved.curated_dir(sampled, workdir)))
    elif kind == "raw":
      out += [arm(label, ratio, name, directory) for ratio in resolved.arm_ratios(config)]
    else:
      out.append(arm(label, r, name, directory))
  return out


def _stage(name: str, done: Callable[..., bool], run: Callable, *args) -> Stage:
  """A stage whose done-check and job take the same arguments."""
  return Stage(name, functools.partial(done, *args), functools.partial(run, *args))


def _prepare_once(config, workdir) -> None:
  """Records are written by process 0 alone; the others wait for them."""
  if jax.process_index() == 0:
    prepare.run(config, workdir)
  parallel.barrier("prepare")


def _train_stages(config, workdir, label: str = "") -> list[Stage]:
  """Train G (and G_SR for the cascade)."""
  suffix = f" {label}" if label else ""
  out = [_stage(f"train_diffusion{suffix}", train_diffusion.is_complete, train_diffusion.run, config, workdir)]
  if config.sample.super_resolve:
    out.append(_stage(f"train_sr{suffix}", train_sr.is_complete, train_sr.run, config, workdir))
  return out


def _score_stage(config, workdir, name: str, directory, label: str) -> Stage:
  """evaluate_samples of the set `name` in `directory`."""
  return Stage(f"evaluate_samples {label}",
               functools.partial(sample_quality.is_complete, config, workdir, directory, name),
               functools.partial(sample_quality.run_for, config, workdir, directory, name))


def _set_stages(config, workdir, label: str) -> list[Stage]:
  """Sample the set of `config` (a resolved.experiment_set) and score it."""
  return [_stage(f"sample {label}", sample.is_complete, sample.run, config, workdir),
          _score_stage(config, workdir, resolved.synthetic_set(config), resolved.synthetic_dir(config, workdir),
                       label)]


def _curate_stages(config, workdir, label: str) -> list[Stage]:
  """Curate the pool of `config` (a resolved.experiment_set) and score the curated set."""
  return [_stage(f"curate {label}", curate.is_complete, curate.run, config, workdir),
          _score_stage(config, workdir, resolved.curated_set(config), resolved.curated_dir(config, workdir),
                       f"{label}_curated")]


def stages(config, workdir) -> list[Stage]:
  """The chain in order: prepare, G, the metric encoder (when a judge is it), each set the arms need, D's
  runs (which also score curation's pools, and the sets when sample_quality.encoder is real_only), the
  curated sets, then the other arms' runs."""
  kinds = config.experiment.arms
  out = [Stage("prepare", functools.partial(prepare.is_complete, config, workdir),
               functools.partial(_prepare_once, config, workdir))]
  out += _train_stages(config, workdir)
  judges = {resolved.sample_encoder(config).name, resolved.curation_scorer(config).name}
  if resolved.METRIC_ENCODER in judges:
    out.append(_stage("train_metric_encoder", train_metric_encoder.is_complete, train_metric_encoder.run, config,
                      workdir))
  scored_after_d = resolved.sample_encoder(config).name != resolved.METRIC_ENCODER
  deferred = []  # the sets' evaluate_samples, when D's first run is their encoder

  def set_stages(set_config, label):
    sampling, scoring = _set_stages(set_config, workdir, label)
    if scored_after_d:
      deferred.append(scoring)
      return [sampling]
    return [sampling, scoring]

  unconditional = resolved.experiment_set(config, conditioned=False)
  conditioned = resolved.experiment_set(config, conditioned=True)
  if {"raw", "curated"} & set(kinds):
    out += set_stages(unconditional, "D'")
  if {"conditioned", "conditioned_curated"} & set(kinds):
    out += set_stages(conditioned, "D'_conditioned")
  if config.experiment.image_only_baseline:
    image_only = resolved.experiment_set(config, conditioned=False)
    with image_only.unlocked():
      image_only.diffusion.joint_labels = False
    out += _train_stages(image_only, workdir, "image_only") + set_stages(image_only, "image_only")
  real_arm, *synthetic_arms = arms(config, workdir)
  out += _arm_stages(config, workdir, real_arm)  # first: the real-only run also scores curation's pools
  out += deferred
  if "curated" in kinds:
    out += _curate_stages(unconditional, workdir, "D'")
  if "conditioned_curated" in kinds:
    out += _curate_stages(conditioned, workdir, "D'_conditioned")
  for arm in synthetic_arms:
    out += _arm_stages(config, workdir, arm)
  return out


def _arm_stages(config, workdir, arm: Arm) -> list[Stage]:
  """Train and evaluate each seed's run of one arm."""
  out = []
  for run in arm.runs:
    out.append(_stage(f"train_segmentation {run.name}", train_segmentation.is_complete, train_segmentation.train_run,
                      config, workdir, run, arm.synthetic_dir))
    out.append(Stage(f"evaluate {run.name}", functools.partial(evaluate.is_complete, workdir, run),
                     functools.partial(evaluate.evaluate_run, config, workdir, run)))
  return out


def _read_json(path) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _arm_label(arm: Arm) -> str:
  return arm.label if arm.synthetic_ratio == 0 else f"{arm.label} (`{pathlib.Path(arm.synthetic_dir).name}`)"


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
  splits = {split: records.read_manifest(layout.data_dir(workdir, split)) for split in layout.HELD_OUT}
  return report.summary_markdown(config, evals, quality, times, others, splits, convergence(config, workdir))


def _val_curves(config, workdir) -> dict[str, tuple[list[int], list[float]]]:
  """Each arm's val mIoU against step, the mean over its seeds (segmentation.eval_every)."""
  out = {}
  for arm in arms(config, workdir):
    logs = [report.read_jsonl(layout.metrics_path(workdir, run.name, ".jsonl")) for run in arm.runs]
    steps, values = report.mean_curve([rows for rows in logs if rows], "val_miou")
    if steps:
      out[_arm_label(arm)] = (steps, values)
  return out


def convergence(config, workdir) -> str:
  """Whether D (real only) had converged when every arm stopped: its mean val curve's change over the
  last fifth of training, against experiment.flat_within."""
  curves = _val_curves(config, workdir)
  real = curves.get(_arm_label(arms(config, workdir)[0]))
  steps = config.segmentation.train.num_steps
  window = max(steps // 5, config.segmentation.eval_every)  # at least two points
  change = report.tail_change(*real, window) if real else None
  if change is None:
    return ("D's val curve has too few points to judge convergence (segmentation.eval_every="
            f"{config.segmentation.eval_every}).")
  flat = abs(change) <= config.experiment.flat_within
  verdict = ("converged" if flat else
             "NOT converged: raise segmentation.train.num_steps, since arms that mix synthetic pairs in see each "
             "real pair less often and lose at a budget too short for D")
  return (f"Every arm trains for the same {steps} steps. D's val mIoU (mean over seeds) changed by "
          f"{100 * change:+.2f} points over the last fifth of training (steps {steps - window}-{steps}): {verdict} "
          f"(flat means within experiment.flat_within={100 * config.experiment.flat_within:g} points). "
          "Curves: `report/val_curves.png`.")


def _write_curves(config, workdir) -> None:
  """report/training_curves_<model>.png: the loss of every trained run against its step; report/val_curves.png:
  each arm's mean val mIoU against step."""
  curves = _val_curves(config, workdir)
  if curves:
    viz.save_png(viz.line_chart({k: (s, [100 * v for v in vs]) for k, (s, vs) in curves.items()},
                                "val mIoU while training (mean over seeds)", x_label="step", y_label="val mIoU %"),
                 layout.report_path(workdir, "val_curves.png"))
  runs = {"generator": [resolved.g_run(config)] + ([resolved.sr_run(config)] if config.sample.super_resolve else []),
          "segmenters": [run.name for arm in arms(config, workdir) for run in arm.runs] + [resolved.METRIC_ENCODER]}
  for kind, names in runs.items():
    logs = {name: report.read_jsonl(layout.metrics_path(workdir, name, ".jsonl")) for name in names}
    if any(logs.values()):
      viz.save_png(report.training_curves({k: v for k, v in logs.items() if v}, "loss", f"{kind}: training loss"),
                   layout.report_path(workdir, f"training_curves_{kind}.png"))


STAGE_TIMES = "experiment_stage_seconds"  # metrics/<this>.json: wall and compile time of each stage's last run


class _CompileClock:
  """Wall seconds in which this process traced, lowered or compiled XLA programs (jax.monitoring events).

  A union of intervals, not a sum: the training loop compiles a step on another thread while its
  init compiles and runs (train/loop.py), and that overlap is time the user does not wait twice.
  """

  _intervals: list[tuple[float, float]] = []
  _registered = False

  @classmethod
  def start(cls) -> None:
    if not cls._registered:  # listeners cannot be removed: register once per process
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      cls._registered = True

  @classmethod
  def _on_event(cls, event: str, duration: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
      end = time.monotonic()
      cls._intervals.append((end - duration, end))

  @classmethod
  def seconds_since(cls, start: float) -> float:
    """Wall seconds after `start` (time.monotonic) covered by at least one compile; forgets earlier ones."""
    covered, reach = 0.0, start
    for begin, end in sorted(cls._intervals):
      covered += max(0.0, end - max(begin, reach))
      reach = max(reach, end)
    cls._intervals = [i for i in cls._intervals if i[1] > start]
    return covered


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
    t0, clock = time.time(), time.monotonic()
    stage.run()
    seconds, compile_seconds = time.time() - t0, _CompileClock.seconds_since(clock)
    if is_writer:
      _record_time(workdir, stage.name, seconds, compile_seconds)
    print(f"{prefix}: done in {report.format_seconds(seconds)} (compiling {report.format_seconds(compile_seconds)})",
          flush=True)
  if is_writer:
    _write_curves(config, workdir)
    text = summary(config, workdir)
    path = atomic.write_bytes(layout.report_path(workdir, "summary.md"), text.encode())
    print(f"\n{text}\n[experiment] finished in {report.format_seconds(time.time() - started)}; wrote {path}",
          flush=True)
