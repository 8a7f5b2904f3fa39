"""`--mode=evaluate`: this config's segmenter on <workdir>/data/val -> per-class IoU / F1, mIoU, mF1.

One ordered pass over the split; the padding rows of the last batch (valid=False) are
masked out. Each batch gives a confusion matrix inside jit, summed on the host and scored
once (metrics/segmentation.py), so the means are over classes of split-level scores.
Writes `<workdir>/metrics/eval_<run>.json` and `<workdir>/report/eval_<run>.png`, prints a
table and returns the scores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from satsynth_jax import atomic, parallel, viz
from satsynth_jax.data import pipeline
from satsynth_jax.metrics import segmentation as seg_metrics
from satsynth_jax.train import segmentation

PREVIEW_EXAMPLES = 8
PREVIEW_TILE = 128  # px per panel in the report; small patches are enlarged by an integer factor


@dataclasses.dataclass
class SplitResult:
  confusion: np.ndarray  # int64 [K, K]: rows true class, columns predicted
  num_examples: int  # examples counted (padding excluded), over all processes
  preview: dict[str, np.ndarray]  # the first examples of this process: "image" uint8, "mask", "pred"


def background_index(class_names: Sequence[str]) -> int | None:
  """Index of the class named "background" (iSAID), else None (LoveDA, OpenEarthMap, the demo)."""
  names = [name.lower() for name in class_names]
  return names.index("background") if "background" in names else None


def eval_step(variables, batch, *, model: nn.Module, num_classes: int,
              ignore_index: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(confusion matrix [K, K], number of valid rows, predictions [B, H, W]) of one global batch."""
  logits = model.apply(variables, batch["image"], train=False)
  preds = jnp.argmax(logits, axis=-1)
  labels = jnp.where(batch["valid"][:, None, None], batch["mask"], ignore_index)
  confusion = seg_metrics.confusion_matrix(labels, preds, num_classes, ignore_index)
  return confusion, jnp.sum(batch["valid"]), preds


def evaluate_split(config, model: nn.Module, variables, record_dir: str, mesh,
                   num_preview: int = PREVIEW_EXAMPLES) -> SplitResult:
  """Confusion matrix of `variables` over every example of `record_dir`, plus a few for a preview."""
  d = config.data
  batch_size = parallel.per_process_batch_size(config.segmentation.eval_batch_size,
                                               "segmentation.eval_batch_size", mesh)
  batches = pipeline.segmentation_batches(config, record_dir, batch_size=batch_size, seed=config.seed, train=False)
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = jax.jit(functools.partial(eval_step, model=model, num_classes=d.num_classes, ignore_index=d.ignore_index),
                 in_shardings=(replicated, sharded), out_shardings=(replicated, replicated, sharded))
  per_batch = []  # fetched after the loop, so reading the next batch overlaps the device's work
  shown: dict[str, list[np.ndarray]] = {"image": [], "mask": [], "pred": []}
  with jax.set_mesh(mesh):
    for batch in batches:
      batch_confusion, count, preds = step(variables, parallel.to_global(batch, mesh))
      per_batch.append((batch_confusion, count))
      if len(shown["image"]) < num_preview:
        local_preds = np.asarray(multihost_utils.global_array_to_host_local_array(preds, mesh, sharded.spec))
        for i in np.flatnonzero(batch["valid"])[:num_preview - len(shown["image"])]:
          shown["image"].append(np.round(batch["image"][i] * 255).astype(np.uint8))
          shown["mask"].append(batch["mask"][i])
          shown["pred"].append(local_preds[i])
  confusion, num_examples = None, 0
  for batch_confusion, count in parallel.to_host(per_batch):
    confusion = seg_metrics.accumulate(confusion, batch_confusion)
    num_examples += int(count)
  return SplitResult(confusion, num_examples, {k: np.stack(v) for k, v in shown.items()})


def _json_safe(value):
  """NaN (undefined scores) -> null, so the file is standard JSON."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def _enlarge(picture: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement: shows the true pixels of small patches."""
  return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def report_picture(config, preview: dict[str, np.ndarray], scores: dict[str, float], title: str) -> Image.Image:
  """Rows of image | ground truth | prediction, the class legend, and a per-class IoU bar chart."""
  d = config.data
  factor = max(1, PREVIEW_TILE // preview["image"].shape[1])
  gap = np.full((preview["image"].shape[1] * factor, 4, 3), 255, np.uint8)
  rows = []
  for image, mask, pred in zip(preview["image"], preview["mask"], preview["pred"]):
    image, truth, predicted = (_enlarge(panel, factor) for panel in (
        image, viz.colorize(mask, d.palette, d.ignore_index), viz.colorize(pred, d.palette, d.ignore_index)))
    rows.append(np.concatenate([image, gap, truth, gap, predicted], axis=1))
  grid = viz.image_grid(rows, columns=2, pad=8)
  has_ignore = bool(np.any(preview["mask"] == d.ignore_index))
  examples = viz.stack([grid, viz.legend(d.class_names, d.palette, grid.width, with_ignore=has_ignore)])
  ious = [scores[f"iou/{name}"] for name in d.class_names]
  chart = viz.bar_chart([0.0 if math.isnan(v) else v for v in ious],
                        [f"{name} (absent)" if math.isnan(v) else name for name, v in zip(d.class_names, ious)],
                        f"per-class IoU (mIoU {scores['miou']:.3f})", colors=d.palette, value_label="IoU",
                        value_format=lambda v: f"{v:.3g}", width=max(600, grid.width))
  return viz.titled(viz.stack([viz.titled(examples, "image | ground truth | prediction", size=14), chart]), title)


def _percent(value: float) -> str:
  return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def score_table(scores: dict[str, float], class_names: Sequence[str]) -> str:
  """Per-class IoU and F1 in percent, then the means (without background too, when scored)."""
  width = max(len(name) for name in [*class_names, "mean w/o background"])
  lines = [f"  {'class':<{width}}  {'IoU %':>7}  {'F1 %':>7}"]
  for name in class_names:
    lines.append(f"  {name:<{width}}  {_percent(scores[f'iou/{name}']):>7}  {_percent(scores[f'f1/{name}']):>7}")
  lines.append(f"  {'mean':<{width}}  {_percent(scores['miou']):>7}  {_percent(scores['mf1']):>7}")
  if "miou_no_background" in scores:
    lines.append(f"  {'mean w/o background':<{width}}  {_percent(scores['miou_no_background']):>7}  "
                 f"{_percent(scores['mf1_no_background']):>7}")
  return "\n".join(lines)


def run(config, workdir: str) -> dict[str, float]:
  """--mode=evaluate: score the latest checkpoint of this config's segmenter run on the val split."""
  d = config.data
  name = segmentation.run_name(config)
  mesh = parallel.make_mesh()
  model, variables, step = segmentation.restore_variables(config, workdir, mesh)
  val_dir = os.path.join(workdir, "data", "val")
  result = evaluate_split(config, model, variables, val_dir, mesh)
  background = background_index(d.class_names)
  scores = seg_metrics.segmentation_scores(result.confusion, d.class_names, background)
  if jax.process_index() == 0:
    summary = {
        "run": name, "model": config.segmentation.model, "synthetic_ratio": d.synthetic_ratio,
        "checkpoint_step": step, "split": "val", "records": val_dir, "num_examples": result.num_examples,
        "class_names": list(d.class_names), "background_index": background,
        "scores": _json_safe(scores), "confusion_matrix": result.confusion.tolist(),
    }
    atomic.write_bytes(os.path.join(workdir, "metrics", f"eval_{name}.json"),
                       json.dumps(summary, indent=1, allow_nan=False).encode())
    title = f"{name}: step {step}, R={d.synthetic_ratio}, {result.num_examples} val examples"
    viz.save_png(report_picture(config, result.preview, scores, title),
                 os.path.join(workdir, "report", f"eval_{name}.png"))
    print(f"evaluate {title}\n{score_table(scores, d.class_names)}", flush=True)
  return scores
