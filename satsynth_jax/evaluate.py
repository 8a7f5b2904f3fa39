"""`--mode=evaluate`: a segmenter run on <workdir>/data/val -> per-class IoU / F1, mIoU, mF1.

One ordered pass over the split; the padding rows of the last batch (valid=False) are
masked out. Each batch gives a confusion matrix inside jit, summed on the host and scored
once (metrics/segmentation.py), so the means are over classes of split-level scores.
Writes `<workdir>/metrics/eval_<run>.json` and `<workdir>/report/eval_<run>.png`, prints a
table and returns the scores. The `Evaluator` here also scores the val split during training
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

from satsynth_jax import atomic, parallel, report, segmenter, viz, workdir as layout
from satsynth_jax.data import pipeline
from satsynth_jax.metrics import segmentation as seg_metrics

PREVIEW_EXAMPLES = 8


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


def evaluate_run(config, workdir, run: segmenter.Run) -> dict[str, float]:
  """Score the latest checkpoint of segmenter `run` on the val split; writes its eval JSON and PNG."""
  d = config.data
  name = run.name
  mesh = parallel.make_mesh()
  model, variables, step = segmenter.restore(config, workdir, run, mesh)
  val_dir = layout.data_dir(workdir, "val")
  result = evaluate_split(config, model, variables, val_dir, mesh)
  background = background_index(config)
  scores = seg_metrics.segmentation_scores(result.confusion, d.class_names, background)
  if jax.process_index() == 0:
    summary = {
        "run": name, "architecture": run.architecture, "synthetic_ratio": run.synthetic_ratio, "seed": run.seed,
        "checkpoint_step": step, "split": "val", "records": str(val_dir), "num_examples": result.num_examples,
        "class_names": list(d.class_names), "background_index": background,
        "scores": _json_safe(scores), "confusion_matrix": result.confusion.tolist(),
    }
    atomic.write_bytes(eval_path(workdir, run), json.dumps(summary, indent=1, allow_nan=False).encode())
    title = f"{name}: step {step}, R={run.synthetic_ratio}, {result.num_examples} val examples"
    viz.save_png(report.report_picture(config, result.preview, scores, title),
                 layout.report_path(workdir, f"eval_{name}.png"))
    print(f"evaluate {title}\n{report.score_table(scores, d.class_names)}", flush=True)
  return scores


def run(config, workdir) -> dict[str, float]:
  """--mode=evaluate: score this config's segmenter run (data.synthetic_ratio) on the val split."""
  return evaluate_run(config, workdir, segmenter.Run.from_config(config))
