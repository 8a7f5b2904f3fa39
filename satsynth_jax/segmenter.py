"""The segmenter as inference sees it: build, restore, and the passes of a model over a record folder.

A segmenter run (resolved.SegmenterRun) is one trained model with its own checkpoint folder:
the experiment's arms and the metric encoder. `shaping` is what a run records and is refused
under (infra/identity.py); `restore` builds the model and reads its EMA weights.

Two ordered passes over a record folder serve every job that scores with a segmenter:
`Evaluator` (a confusion matrix per split: --mode=evaluate, the val curve while a run trains,
label fidelity in --mode=evaluate_samples) and `scored_batches` (per-pixel losses and argmax:
curation). Both read the folder in order through the eval pipeline, so nothing random is drawn.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from satsynth_jax import generator, models, resolved
from satsynth_jax.data import pipeline
from satsynth_jax.infra import checkpoint, identity, parallel, workdir as layout
from satsynth_jax.metrics import curation, segmentation as seg_metrics

PREVIEW_EXAMPLES = 8

SHAPING = ("dtype", "data.num_classes", "data.ignore_index", "data.augment", "data.resize",
           "segmentation.backbone_stages", "segmentation.base_width", "segmentation.pretrained_path",
           "segmentation.image_size")


def shaping(config, run: resolved.SegmenterRun, synthetic: dict | None, workdir=None) -> dict:
  """The settings that shape a segmenter run; `synthetic` is the recorded identity of its set (R > 0);
  with `workdir`, also what its prepared train split is (splits.data_identity)."""
  out = {**identity.select(config, SHAPING), **generator.train_shaping(config, "segmentation.train"),
         "architecture": run.architecture, "synthetic_ratio": run.synthetic_ratio, "seed": run.seed,
         "input_size": resolved.segmenter_size(config),  # data.image_size when segmentation.image_size is 0
         **generator.data_shaping(workdir)}
  if run.synthetic_ratio > 0:
    out.update({"data.synthetic_fraction": config.data.synthetic_fraction, "synthetic_set": synthetic})
  return out


def build(config, architecture: str) -> nn.Module:
  g = config.segmentation
  return models.SEGMENTERS[architecture](num_classes=config.data.num_classes,
                                         backbone_stages=tuple(int(n) for n in g.backbone_stages),
                                         dtype=jnp.dtype(config.dtype), base_width=int(g.base_width))


def init_variables(model: nn.Module, size: int, rng: jax.Array) -> dict:
  """{"params", "batch_stats"} of a fresh model for size x size RGB inputs."""
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


@functools.lru_cache(maxsize=8)
def abstract_variables(model: nn.Module, size: int) -> dict:
  """Shapes and dtypes of init_variables (traced once per model and size: an experiment restores the same
  segmenter for each of its many evaluations)."""
  return jax.eval_shape(functools.partial(init_variables, model, size), jax.random.key(0))


def restore(config, workdir, run: resolved.SegmenterRun, mesh,
            step: int | None = None) -> tuple[nn.Module, dict, int]:
  """(model, {"params", "batch_stats"} replicated on `mesh`, checkpoint step) of `run`; latest if step None.

  The params are the EMA weights when the run kept them. A run trained with other settings than
  `config`'s (or on other prepared data) is refused naming each key, before any checkpoint is read.
  """
  check_trained_with(config, workdir, run)
  model = build(config, run.architecture)
  abstract = abstract_variables(model, resolved.segmenter_size(config))
  mode = "train_metric_encoder" if run.name == resolved.METRIC_ENCODER else "train_segmentation"
  variables, step = checkpoint.restore_inference(layout.checkpoint_dir(workdir, run.name), abstract, mesh, step,
                                                 hint=f"run --mode={mode} first")
  return model, variables, step


def check_trained_with(config, workdir, run: resolved.SegmenterRun) -> None:
  """Refuse a run whose recorded shaping differs from `config`'s on this workdir's data (its synthetic
  set as recorded: scoring a run never reads that set), or whose config.json is damaged or gone."""
  directory = layout.checkpoint_dir(workdir, run.name)
  recorded = identity.read_existing(directory, f"checkpoints of run {run.name!r}")
  if recorded is not None:
    expected = shaping(config, run, recorded["shaping"].get("synthetic_set"), workdir)
    identity.compare(directory, recorded["shaping"], expected, f"run {run.name!r}",
                     "pass the settings it was trained with (its config.json), or retrain it")


# ---- passes over a record folder ----


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
    # Shared by value: every run's Evaluator of an equal model reuses one traced and compiled program.
    self._step = parallel.shared_jit(functools.partial(eval_step, model=model, num_classes=d.num_classes,
                                                       ignore_index=d.ignore_index),
                                     in_shardings=(replicated, self.sharded),
                                     out_shardings=(replicated, replicated, self.sharded))

  def _batches(self):
    return pipeline.segmentation_batches(self.config, self.record_dir, batch_size=self.batch_size,
                                         seed=self.config.seed, train=False)

  def compile(self, variables_shapes) -> None:
    """Compile the eval step for variables of these shapes (ShapeDtypeStructs) and the split's batches."""
    batch = checkpoint.abstract_like(parallel.to_global(next(iter(self._batches())), self.mesh))
    self._step.lower(variables_shapes, batch).compile()

  def split(self, variables, num_preview: int = PREVIEW_EXAMPLES) -> SplitResult:
    """Confusion matrix of `variables` over every example of the split, plus a few for a preview."""
    # Opened per call (a manifest read): building an Evaluator touches no files, so a task can hold one unused.
    batches = self._batches()
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


def make_score_fn(model: nn.Module, mesh, ignore_index: int):
  """Jitted (variables, image [B, S, S, 3], mask [B, S, S]) -> (loss, argmax), batch-sharded on `mesh`."""

  def score(variables, image, mask):
    return curation.pixel_losses(model.apply(variables, image, train=False), mask, ignore_index)

  sharded = parallel.batch_sharding(mesh)
  return jax.jit(score, in_shardings=(parallel.replicated(mesh), sharded, sharded), out_shardings=(sharded, sharded))


def _record_indices(batch: int, rows: int, rows_per_process: int, process_count: int) -> np.ndarray:
  """The record index of each global row: process p's k-th eval example is record k x n + p."""
  row = np.arange(rows)
  return (batch * rows_per_process + row % rows_per_process) * process_count + row // rows_per_process


def scored_batches(config, score_fn, variables, record_dir, mesh) -> Iterator[tuple[np.ndarray, ...]]:
  """(record indices, loss, argmax, mask) of every example of `record_dir` at the scorer's size.

  One ordered pass through the eval pipeline; padding rows are dropped. Every process gets
  every row (gathered), so all of them compute the same statistics and selection.
  """
  local = parallel.per_process_batch_size(config.segmentation.eval_batch_size, "segmentation.eval_batch_size", mesh)
  batches = pipeline.segmentation_batches(config, record_dir, batch_size=local, seed=config.seed, train=False)
  processes = jax.process_count()

  def fetch(pending):
    b, (loss, pred), mask, valid = pending
    loss, pred, mask, valid = parallel.to_host((loss, pred, mask, valid))
    index = _record_indices(b, len(valid), local, processes)
    return index[valid], loss[valid], pred[valid], mask[valid]

  pending = None
  with jax.set_mesh(mesh):
    for b, batch in enumerate(batches):
      batch = parallel.to_global({"image": batch["image"], "mask": batch["mask"], "valid": batch["valid"]}, mesh)
      current = (b, score_fn(variables, batch["image"], batch["mask"]), batch["mask"], batch["valid"])
      if pending is not None:  # fetch one batch behind, so the device never waits for the host
        yield fetch(pending)
      pending = current
  if pending is not None:
    yield fetch(pending)
