"""`--mode=evaluate`: a segmenter run on the held-out splits -> per-class IoU / F1, mIoU, mF1.

Both held-out splits are scored: test (where claims are made; nothing is ever chosen on it)
and val (where settings are chosen). One ordered pass over each split; the padding rows of
the last batch (valid=False) are masked out. Each batch gives a confusion matrix inside jit,
summed on the host and scored once (metrics/segmentation.py), so the means are over classes
of split-level scores. Writes `<workdir>/metrics/eval_<run>.json` (each split's scores, the
checkpoint step and the run's recorded settings, so a score is never read under other
settings) and `<workdir>/report/eval_<run>.png` (test predictions), prints a table per split
and returns the scores. The `Evaluator` here also scores the val split during training
(segmentation.eval_every); those numbers are only logged, this mode's are the run's result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from satsynth_jax import atomic, identity, parallel, report, segmenter, viz, workdir as layout
from satsynth_jax.data import pipeline
from satsynth_jax.metrics import segmentation as seg_metrics

PREVIEW_EXAMPLES = 8
SPLITS = ("test", "val")  # the held-out splits a run is scored on, the claim's first


@dataclasses.dataclass
class SplitResult:
  confusion: np.ndarray  # int64 [K, K]: rows true class, columns predicted
  num_examples: int  # examples counted (padding excluded), over all processes
  preview: dict[str, np.ndarray]  # the first examples of this process: "image" uint8, "mask", "pred"; {} if none


def background_index(config) -> int | None:
  """data.background_index: a class that means "everything else" (iSAID's 0), or None (-1: LoveDA, OEM, demo)."""
  index = config.data.background_index
  return None if index < 0 else int(index)


def eval_step(variables, batch, *, model: nn.Module, num_classes: int,
              ignore_index: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(confusion matrix [K, K], number of valid rows, predictions [B, H, W]) of one global batch."""
  logits = model.apply(variables, batch["image"], train=False)
  preds = jnp.argmax(logits, axis=-1)
  labels = jnp.where(batch["valid"][:, None, None], batch["mask"], ignore_index)
  confusion = seg_metrics.confusion_matrix(labels, preds, num_classes, ignore_index)
  return confusion, jnp.sum(batch["valid"]), preds


class Evaluator:
  """Scores segmenter variables on one record split; the eval step is jitted once and reused.

  big_vision style: --mode=evaluate runs it once on a restored checkpoint, and the training
  loop runs the same object every segmentation.eval_every steps on the live state
  (train/segmentation.py), so the two numbers come from one program. Nothing random: the
  split is read in order, so a run's batches and keys are untouched.
  """

  def __init__(self, config, model: nn.Module, record_dir, mesh):
    d = config.data
    self.config, self.record_dir, self.mesh = config, record_dir, mesh
    self.batch_size = parallel.per_process_batch_size(config.segmentation.eval_batch_size,
                                                      "segmentation.eval_batch_size", mesh)
    self.sharded = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    self._step = jax.jit(functools.partial(eval_step, model=model, num_classes=d.num_classes,
                                           ignore_index=d.ignore_index),
                         in_shardings=(replicated, self.sharded), out_shardings=(replicated, replicated, self.sharded))

  def split(self, variables, num_preview: int = PREVIEW_EXAMPLES) -> SplitResult:
    """Confusion matrix of `variables` over every example of the split, plus a few for a preview."""
    # Opened per call (a manifest read): building an Evaluator touches no files, so a task can hold one unused.
    batches = pipeline.segmentation_batches(self.config, self.record_dir, batch_size=self.batch_size,
                                            seed=self.config.seed, train=False)
    per_batch = []  # fetched after the loop, so reading the next batch overlaps the device's work
    shown: dict[str, list[np.ndarray]] = {"image": [], "mask": [], "pred": []}
    with jax.set_mesh(self.mesh):
      for batch in batches:
        batch_confusion, count, preds = self._step(variables, parallel.to_global(batch, self.mesh))
        per_batch.append((batch_confusion, count))
        if len(shown["image"]) < num_preview:
          local_preds = np.asarray(multihost_utils.global_array_to_host_local_array(preds, self.mesh,
                                                                                    self.sharded.spec))
          for i in np.flatnonzero(batch["valid"])[:num_preview - len(shown["image"])]:
            shown["image"].append(np.round(batch["image"][i] * 255).astype(np.uint8))
            shown["mask"].append(batch["mask"][i])
            shown["pred"].append(local_preds[i])
    confusion, num_examples = None, 0
    for batch_confusion, count in parallel.to_host(per_batch):
      confusion = seg_metrics.accumulate(confusion, batch_confusion)
      num_examples += int(count)
    return SplitResult(confusion, num_examples, {k: np.stack(v) for k, v in shown.items() if v})

  def scores(self, variables) -> dict[str, float]:
    """segmentation_scores of `variables` on the split (miou, mf1, per class, ...); no preview."""
    d = self.config.data
    return seg_metrics.segmentation_scores(self.split(variables, num_preview=0).confusion, d.class_names,
                                           background_index(self.config))


def evaluate_split(config, model: nn.Module, variables, record_dir: str, mesh,
                   num_preview: int = PREVIEW_EXAMPLES) -> SplitResult:
  """Confusion matrix of `variables` over every example of `record_dir`, plus a few for a preview."""
  return Evaluator(config, model, record_dir, mesh).split(variables, num_preview)


def _json_safe(value):
  """NaN (undefined scores) -> null, so the file is standard JSON."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def eval_path(workdir, run: segmenter.Run):
  return layout.metrics_path(workdir, f"eval_{run.name}")


def recorded_settings(workdir, run: segmenter.Run) -> dict:
  """The settings a segmenter run recorded beside its checkpoints (what its scores were made under)."""
  recorded = identity.read(layout.checkpoint_dir(workdir, run.name))
  return recorded["shaping"] if recorded else {}


def is_current(workdir, run: segmenter.Run, step: int | None) -> bool:
  """Does the run's eval JSON score checkpoint `step` under the settings the run records now?"""
  try:
    with open(eval_path(workdir, run), encoding="utf-8") as f:
      scored = json.load(f)
  except FileNotFoundError:
    return False
  return (scored.get("checkpoint_step") == step and scored.get("settings") == recorded_settings(workdir, run)
          and set(scored.get("splits", {})) == set(SPLITS))


def evaluate_run(config, workdir, run: segmenter.Run) -> dict[str, dict[str, float]]:
  """Score the latest checkpoint of segmenter `run` on test and val; writes its eval JSON and PNG.

  segmenter.restore refuses a run recorded under other settings than the config's, so a score
  is always made with the settings the run was trained with, and the JSON records them.
  """
  d = config.data
  name = run.name
  mesh = parallel.make_mesh()
  model, variables, step = segmenter.restore(config, workdir, run, mesh)
  background = background_index(config)
  results, scores = {}, {}
  for split in SPLITS:
    results[split] = evaluate_split(config, model, variables, layout.data_dir(workdir, split), mesh)
    scores[split] = seg_metrics.segmentation_scores(results[split].confusion, d.class_names, background)
  if jax.process_index() == 0:
    summary = {
        "run": name, "architecture": run.architecture, "synthetic_ratio": run.synthetic_ratio, "seed": run.seed,
        "checkpoint_step": step, "settings": recorded_settings(workdir, run),
        "class_names": list(d.class_names), "background_index": background,
        "splits": {split: {"records": str(layout.data_dir(workdir, split)), "num_examples": results[split].num_examples,
                           "scores": _json_safe(scores[split]), "confusion_matrix": results[split].confusion.tolist()}
                   for split in SPLITS},
    }
    atomic.write_bytes(eval_path(workdir, run), json.dumps(summary, indent=1, allow_nan=False).encode())
    title = f"{name}: step {step}, R={run.synthetic_ratio}, {results['test'].num_examples} test examples"
    viz.save_png(report.report_picture(config, results["test"].preview, scores["test"], title),
                 layout.report_path(workdir, f"eval_{name}.png"))
    for split in SPLITS:
      print(f"evaluate {name} on {split} ({results[split].num_examples} examples, step {step}):\n"
            f"{report.score_table(scores[split], d.class_names)}", flush=True)
  return scores


def run(config, workdir) -> dict[str, dict[str, float]]:
  """--mode=evaluate: score this config's segmenter run (data.synthetic_ratio) on the test and val splits."""
  return evaluate_run(config, workdir, segmenter.Run.from_config(config))
