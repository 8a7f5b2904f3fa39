"""A segmenter run's training task (jobs/train_segmentation.py runs it): FPN or U-Net on a ResNet, masked
cross-entropy.

A run (resolved.SegmenterRun) trains on the real split D, or on D u D' when its synthetic ratio
R > 0: the first R x |D| synthetic pairs join, mixed into every batch at
data.synthetic_fraction (the pipeline oversamples the smaller set, as the paper does). Each
run has its own checkpoints, `<workdir>/checkpoints/<run>/`, so the paper's D vs D u D'
comparison lives in one workdir.

Every segmentation.eval_every steps the run scores the val split (segmenter.Evaluator, the
program --mode=evaluate runs) and logs val_miou / val_mf1 beside its loss. Those points are
a curve to watch, never a selection: a run's reported score is --mode=evaluate's on its last
checkpoint, and no checkpoint is kept or picked for its val score.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from satsynth_jax import resolved, segmenter
from satsynth_jax.data import pipeline, records
from satsynth_jax.infra import checkpoint, identity, parallel, workdir as layout
from satsynth_jax.infra.errors import SatSynthError
from satsynth_jax.models import resnet
from satsynth_jax.train import loop, optim
from satsynth_jax.train.state import TrainState

Backbone = tuple[dict, dict]  # (params, batch_stats) of the "backbone" submodule


class NotEnoughSyntheticDataError(SatSynthError, ValueError):
  """The synthetic set holds fewer than R x |D| pairs; the message names both counts and the folder."""


class SyntheticSizeError(SatSynthError, ValueError):
  """Synthetic pairs of another size than the segmenter's input; the message says how to proceed."""


def load_backbone(config, model: nn.Module) -> Backbone | None:
  """ImageNet weights for the backbone from segmentation.pretrained_path; None when it is unset."""
  path = config.segmentation.pretrained_path
  if not path:
    logging.warning("the segmenter's backbone trains from scratch: set segmentation.pretrained_path to a "
                    ".safetensors of torchvision ResNet-50 weights to start from ImageNet (README)")
    return None
  abstract = segmenter.abstract_variables(model, resolved.segmenter_size(config))
  try:
    return resnet.load_pretrained(abstract["params"]["backbone"], abstract["batch_stats"]["backbone"], path)
  except resnet.PretrainedWeightsError as e:
    raise resnet.PretrainedWeightsError(f"config.segmentation.pretrained_path: {e}") from e


def init_state(model: nn.Module, size: int, t, rng: jax.Array, backbone: Backbone | None = None) -> TrainState:
  """Random init with BatchNorm statistics; the backbone's variables replaced by `backbone` if given.

  Under the loop's jit, given weights are captured as constants of this one-off program
  (about 100 MB for ResNet-50, well below JAX's 2 GB warning).
  """
  variables = segmenter.init_variables(model, size, rng)
  params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
  if backbone is not None:
    params["backbone"], batch_stats["backbone"] = backbone
  tx, _ = optim.make_optimizer(t)
  return TrainState.create(params, tx, rng, ema_decay=t.ema_decay, batch_stats=batch_stats)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, pixel accuracy) over the pixels whose label is not `ignore_index`.

  Means are over labelled pixels of the whole (global) batch; a batch with none gives 0.
  """
  labelled = labels != ignore_index
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labelled, labels, 0))
  count = jnp.maximum(jnp.sum(labelled), 1)
  loss = jnp.sum(jnp.where(labelled, per_pixel, 0.0)) / count
  correct = (jnp.argmax(logits, axis=-1) == labels) & labelled
  return loss, jnp.sum(correct) / count


def train_step(state: TrainState, batch, *, model: nn.Module, ignore_index: int,
               lr_schedule: optax.Schedule) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch {"image", "mask", "is_synthetic"}; pure, jitted by the loop.

  BatchNorm runs in training mode and its running statistics come back through
  `mutable`; under jit over the mesh they are taken over the global batch.
  """

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                  train=True, mutable=["batch_stats"])
    loss, accuracy = masked_cross_entropy(logits, batch["mask"], ignore_index)
    return loss, (updates["batch_stats"], accuracy)

  (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {"loss": loss, "pixel_accuracy": accuracy, "lr": lr_schedule(state.step),
             "grad_norm": optax.tree.norm(grads),
             "synthetic_fraction": jnp.mean(batch["is_synthetic"].astype(jnp.float32))}
  return state.apply_gradients(grads, batch_stats=batch_stats), metrics


VAL_SCORES = ("miou", "mf1", "miou_no_background", "mf1_no_background")  # logged as val_<name>


def val_scores(evaluator: segmenter.Evaluator, state: TrainState) -> dict[str, float]:
  """val_miou, val_mf1 (and the means w/o background, if the dataset has one) of the live state.

  Scores the variables a checkpoint of `state` would hold for --mode=evaluate (EMA if kept).
  Logging only: the val split never chooses a checkpoint; the run's result stays the last one's.
  """
  scores = evaluator.scores(checkpoint.inference_variables(state))
  return {f"val_{name}": scores[name] for name in VAL_SCORES if name in scores}


def synthetic_source(config, workdir, ratio: int,
                     synthetic_dir: str | os.PathLike | None) -> tuple[str | None, int | None, dict | None]:
  """(synthetic folder or None, synthetic pairs to use, the set's identity) for a run with ratio R.

  The set must hold R x |D| pairs at segmentation.image_size (or resize_synthetic must allow
  resizing them), so resolution never changes silently between sampling and segmentation.
  """
  if ratio == 0:
    return None, None, None
  real_dir = layout.data_dir(workdir, "train")
  num_real = records.read_manifest(real_dir)["num_examples"]
  if not os.path.isdir(synthetic_dir):  # the common case: the set was never sampled
    raise NotEnoughSyntheticDataError(
        f"config.data.synthetic_ratio={ratio} needs the synthetic set {synthetic_dir}, which does not exist; "
        f"run --mode=sample first (or --mode=curate for a curated set), or set data.synthetic_ratio=0")
  manifest = records.read_manifest(synthetic_dir)
  available = manifest["num_examples"]
  needed = ratio * num_real
  if available < needed:
    raise NotEnoughSyntheticDataError(
        f"config.data.synthetic_ratio={ratio} needs {ratio} x {num_real} = {needed} synthetic pairs "
        f"({num_real} real pairs in {real_dir}), but {synthetic_dir} holds {available}; "
        f"run --mode=sample with sample.per_real >= {ratio}, or lower data.synthetic_ratio")
  size = records.PairSource(synthetic_dir)[0]["image"].shape[0]
  wanted = resolved.segmenter_size(config)
  if size != wanted and not config.segmentation.resize_synthetic:
    raise SyntheticSizeError(
        f"{synthetic_dir}: synthetic pairs are {size}x{size} px but the segmenter's input is {wanted} px "
        f"(segmentation.image_size; 0 = data.image_size); "
        f"set segmentation.image_size={size}, sample at {wanted} px (sample.super_resolve / sr.image_size), or "
        f"pass --config.segmentation.resize_synthetic=True to resize them")
  return os.fspath(synthetic_dir), needed, set_identity(synthetic_dir)


def set_identity(synthetic_dir) -> dict:
  """What a run records of the set it mixes in: the set's recorded shaping, else its size and source."""
  recorded = identity.read(synthetic_dir)
  if recorded:
    return recorded["shaping"]
  manifest = records.read_manifest(synthetic_dir)
  return {"num_examples": manifest["num_examples"], "source": manifest["source"]}


def make_task(config, workdir, mesh, run: resolved.SegmenterRun, synthetic_dir=None) -> loop.Task:
  """The loop's task for `run`; `synthetic_dir` is the set mixed in when run.synthetic_ratio > 0."""
  t = config.segmentation.train
  model = segmenter.build(config, run.architecture)
  synthetic, synthetic_count, synthetic_identity = synthetic_source(config, workdir, run.synthetic_ratio,
                                                                      synthetic_dir)
  backbone = load_backbone(config, model)
  _, lr_schedule = optim.make_optimizer(t)
  batch = parallel.per_process_batch_size(t.batch_size, "segmentation.train.batch_size", mesh)
  every = config.segmentation.eval_every
  # Its own ordered pass over val: the run's batch iterator and step keys are never touched.
  evaluator = segmenter.Evaluator(config, model, layout.data_dir(workdir, "val"), mesh) if every else None
  return loop.Task(
      name=run.name,
      init=functools.partial(init_state, model, resolved.segmenter_size(config), t, backbone=backbone),
      step=functools.partial(train_step, model=model, ignore_index=config.data.ignore_index,
                             lr_schedule=lr_schedule),
      make_batches=lambda: iter(pipeline.segmentation_batches(
          config, layout.data_dir(workdir, "train"), synthetic, batch_size=batch, seed=run.seed, train=True,
          synthetic_fraction=config.data.synthetic_fraction, synthetic_count=synthetic_count)),
      evaluate=functools.partial(val_scores, evaluator) if evaluator else None,
      eval_every=every,
      warm_up=(lambda shapes: evaluator.compile(checkpoint.inference_variables(shapes))) if evaluator else None,
      config=config,
      shaping=functools.partial(segmenter.shaping, config, run, synthetic_identity, workdir),
  )
