"""`--mode=evaluate`: a segmenter run on the held-out splits -> per-class IoU / F1, mIoU, mF1.

Both held-out splits are scored: test (where claims are made; nothing is ever chosen on it)
and val (where settings are chosen). One ordered pass over each split; the padding rows of
the last batch (valid=False) are masked out. Each batch gives a confusion matrix inside jit,
summed on the host and scored once (metrics/segmentation.py), so the means are over classes
of split-level scores. Writes `<workdir>/metrics/eval_<run>.json` (each split's scores, the
checkpoint step and the run's recorded settings, so a score is never read under other
settings) and `<workdir>/report/eval_<run>.png` (test predictions), prints a table per split
and returns the scores. The same `segmenter.Evaluator` also scores the val split during training
(segmentation.eval_every); those numbers are only logged, this mode's are the run's result.
"""

from __future__ import annotations

import json

import jax

from satsynth_jax import resolved, segmenter
from satsynth_jax.infra import atomic, checkpoint, identity, parallel, report, viz, workdir as layout
from satsynth_jax.metrics import segmentation as seg_metrics


def eval_path(workdir, run: resolved.SegmenterRun):
  return layout.metrics_path(workdir, f"eval_{run.name}")


def recorded_settings(workdir, run: resolved.SegmenterRun) -> dict:
  """The settings a segmenter run recorded beside its checkpoints (what its scores were made under)."""
  recorded = identity.read(layout.checkpoint_dir(workdir, run.name))
  return recorded["shaping"] if recorded else {}


def is_complete(workdir, run: resolved.SegmenterRun) -> bool:
  """Does the run's eval JSON score its latest checkpoint under the settings the run records now?"""
  return is_current(workdir, run, checkpoint.latest_step(layout.checkpoint_dir(workdir, run.name)))


def is_current(workdir, run: resolved.SegmenterRun, step: int | None) -> bool:
  """Does the run's eval JSON score checkpoint `step` under the settings the run records now?"""
  try:
    with open(eval_path(workdir, run), encoding="utf-8") as f:
      scored = json.load(f)
  except FileNotFoundError:
    return False
  return (scored.get("checkpoint_step") == step and scored.get("settings") == recorded_settings(workdir, run)
          and set(scored.get("splits", {})) == set(layout.HELD_OUT))


def evaluate_run(config, workdir, run: resolved.SegmenterRun) -> dict[str, dict[str, float]]:
  """Score the latest checkpoint of segmenter `run` on test and val; writes its eval JSON and PNG.

  segmenter.restore refuses a run recorded under other settings than the config's, so a score
  is always made with the settings the run was trained with, and the JSON records them.
  """
  d = config.data
  name = run.name
  mesh = parallel.make_mesh()
  model, variables, step = segmenter.restore(config, workdir, run, mesh)
  background = segmenter.background_index(config)
  results, scores = {}, {}
  for split in layout.HELD_OUT:
    results[split] = segmenter.evaluate_split(config, model, variables, layout.data_dir(workdir, split), mesh)
    scores[split] = seg_metrics.segmentation_scores(results[split].confusion, d.class_names, background)
  if jax.process_index() == 0:
    summary = {
        "run": name, "architecture": run.architecture, "synthetic_ratio": run.synthetic_ratio, "seed": run.seed,
        "checkpoint_step": step, "settings": recorded_settings(workdir, run),
        "class_names": list(d.class_names), "background_index": background,
        "splits": {split: {"records": str(layout.data_dir(workdir, split)), "num_examples": results[split].num_examples,
                           "scores": report.json_safe(scores[split]),
                           "confusion_matrix": results[split].confusion.tolist()}
                   for split in layout.HELD_OUT},
    }
    atomic.write_bytes(eval_path(workdir, run), json.dumps(summary, indent=1, allow_nan=False).encode())
    title = f"{name}: step {step}, R={run.synthetic_ratio}, {results['test'].num_examples} test examples"
    viz.save_png(report.report_picture(config, results["test"].preview, scores["test"], title),
                 layout.report_path(workdir, f"eval_{name}.png"))
    for split in layout.HELD_OUT:
      print(f"evaluate {name} on {split} ({results[split].num_examples} examples, step {step}):\n"
            f"{report.score_table(scores[split], d.class_names)}", flush=True)
  return scores


def run(config, workdir) -> dict[str, dict[str, float]]:
  """--mode=evaluate: score this config's segmenter run (data.synthetic_ratio) on the test and val splits."""
  return evaluate_run(config, workdir, resolved.SegmenterRun.from_config(config))
