"""The segmenter (FPN or U-Net on a ResNet): model, masked cross-entropy step, `--mode=train_segmentation`.

It trains on the real split D, or on D u D' when data.synthetic_ratio R > 0: the first
R x |D| synthetic pairs join, mixed into every batch at data.synthetic_fraction (the
pipeline oversamples the smaller set, as the paper does). Each (model, R) pair is its own
run with its own checkpoints, `<workdir>/checkpoints/<model>_r<R>/`, so the paper's
D vs D u D' comparison lives in one workdir.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from satsynth_jax import checkpoint, parallel, sample
from satsynth_jax.config_check import ConfigError
from satsynth_jax.data import pipeline, records
from satsynth_jax.errors import SatSynthError
from satsynth_jax.models import resnet
from satsynth_jax.models.fpn import FPNSegmenter
from satsynth_jax.models.unet_seg import UNetSegmenter
from satsynth_jax.train import loop, optim
from satsynth_jax.train.state import TrainState

MODELS = {"fpn": FPNSegmenter, "unet": UNetSegmenter}

Backbone = tuple[dict, dict]  # (params, batch_stats) of the "backbone" submodule


class NotEnoughSyntheticDataError(SatSynthError, ValueError):
  """The synthetic set holds fewer than R x |D| pairs; the message names both counts and the folder."""


def run_name(config) -> str:
  """The run's checkpoint folder and metrics prefix, e.g. "fpn_r0" (real only) or "fpn_r3"."""
  return f"{config.segmentation.model}_r{config.data.synthetic_ratio}"


def make_model(config) -> nn.Module:
  g = config.segmentation
  if g.model not in MODELS:
    raise ConfigError(f"config.segmentation.model={g.model!r}: must be one of {tuple(MODELS)}")
  return MODELS[g.model](num_classes=config.data.num_classes,
                         backbone_stages=tuple(int(n) for n in g.backbone_stages),
                         dtype=jnp.dtype(config.dtype))


def _init_variables(config, model: nn.Module, rng: jax.Array) -> dict:
  size = config.data.image_size
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


def load_backbone(config, model: nn.Module) -> Backbone | None:
  """ImageNet weights for the backbone from segmentation.pretrained_path; None when it is unset."""
  path = config.segmentation.pretrained_path
  if not path:
    return None
  if not os.path.isfile(path):
    raise resnet.PretrainedWeightsError(
        f"config.segmentation.pretrained_path={path!r}: no such file (write one with "
        "tools/convert_torchvision_resnet50.py, or set it to '' to train from scratch)")
  abstract = jax.eval_shape(functools.partial(_init_variables, config, model), jax.random.key(0))
  return resnet.load_pretrained(abstract["params"]["backbone"], abstract["batch_stats"]["backbone"], path)


def init_state(config, model: nn.Module, rng: jax.Array, backbone: Backbone | None = None) -> TrainState:
  """Random init with BatchNorm statistics; the backbone's variables replaced by `backbone` if given.

  Under the loop's jit, given weights are captured as constants of this one-off program
  (about 100 MB for ResNet-50, well below JAX's 2 GB warning).
  """
  variables = _init_variables(config, model, rng)
  params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
  if backbone is not None:
    params["backbone"], batch_stats["backbone"] = backbone
  tx, _ = optim.make_optimizer(config.segmentation.train)
  return TrainState.create(params, tx, rng, ema_decay=config.segmentation.train.ema_decay,
                           batch_stats=batch_stats)


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


def training_data(config, workdir: str) -> tuple[str, str | None, int | None]:
  """(real train folder, synthetic folder or None, synthetic pairs to use) for R = data.synthetic_ratio."""
  d = config.data
  real_dir = os.path.join(workdir, "data", "train")
  ratio = d.synthetic_ratio
  if ratio < 0:
    raise ConfigError(f"config.data.synthetic_ratio={ratio}: must be >= 0 (0 trains on real data only)")
  if ratio == 0:
    return real_dir, None, None
  synthetic_dir = d.synthetic_dir or sample.synthetic_dir(workdir)
  num_real = records.read_manifest(real_dir)["num_examples"]
  available = records.read_manifest(synthetic_dir)["num_examples"]
  needed = ratio * num_real
  if available < needed:
    raise NotEnoughSyntheticDataError(
        f"config.data.synthetic_ratio={ratio} needs {ratio} x {num_real} = {needed} synthetic pairs "
        f"({num_real} real pairs in {real_dir}), but {synthetic_dir} holds {available}; "
        f"run --mode=sample with sample.per_real >= {ratio}, or lower data.synthetic_ratio")
  return real_dir, synthetic_dir, needed


def make_task(config, workdir: str, mesh, *, name: str | None = None) -> loop.Task:
  """The loop's task for this config; `name` (default `run_name(config)`) is its checkpoint folder."""
  g = config.segmentation
  model = make_model(config)
  real_dir, synthetic_dir, synthetic_count = training_data(config, workdir)
  backbone = load_backbone(config, model)
  _, lr_schedule = optim.make_optimizer(g.train)
  batch = parallel.per_process_batch_size(g.train.batch_size, "segmentation.train.batch_size", mesh)
  return loop.Task(
      name=name or run_name(config),
      init=functools.partial(init_state, config, model, backbone=backbone),
      step=functools.partial(train_step, model=model, ignore_index=config.data.ignore_index,
                             lr_schedule=lr_schedule),
      make_batches=lambda: iter(pipeline.segmentation_batches(
          config, real_dir, synthetic_dir, batch_size=batch, seed=config.seed, train=True,
          synthetic_fraction=config.data.synthetic_fraction, synthetic_count=synthetic_count)),
  )


def restore_variables(config, workdir: str, mesh, step: int | None = None, *,
                      name: str | None = None) -> tuple[nn.Module, dict, int]:
  """(model, {"params", "batch_stats"} replicated on `mesh`, checkpoint step) of this config's run.

  The params are the EMA weights when the run kept them. `step` None means the latest;
  `name` (default `run_name(config)`) is the run's checkpoint folder.
  """
  model = make_model(config)
  state, step = checkpoint.restore_for_inference(workdir, name or run_name(config),
                                                 functools.partial(init_state, config, model), mesh, step)
  return model, {"params": state.eval_params, "batch_stats": state.batch_stats}, step


def run(config, workdir: str) -> None:
  """--mode=train_segmentation: train this config's segmenter run, resuming from its last checkpoint."""
  mesh = parallel.make_mesh()
  loop.train(make_task(config, workdir, mesh), config.segmentation.train, workdir, seed=config.seed, mesh=mesh)
