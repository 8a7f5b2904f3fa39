"""G: the joint image+mask DDPM. Model, loss step, jitted sampler and `--mode=train_diffusion`.

The model sees concat(image, label code) in [-1, 1] (labels.encode_pair); the label code is
ceil(log2 K) analog bits by default, K one-hot channels for the ablation.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from satsynth_jax import labels, parallel, viz
from satsynth_jax.data import pipeline
from satsynth_jax.diffusion import sampling, schedule
from satsynth_jax.models.unet import UNet, unet_from_config
from satsynth_jax.train import loop, optim
from satsynth_jax.train.state import TrainState

def model_name(config) -> str:
  """Checkpoint folder under <workdir>/checkpoints/: the joint model, or Table 1's image-only baseline."""
  return "diffusion" if config.diffusion.joint_labels else "diffusion_image_only"


def joint_channels(config) -> int:
  if not config.diffusion.joint_labels:
    return 3
  return 3 + labels.num_label_channels(config.data.num_classes, config.data.label_encoding)


def make_model(config) -> UNet:
  return unet_from_config(config.model, joint_channels(config), config.dtype)


def make_schedule(config) -> schedule.Schedule:
  d = config.diffusion
  return schedule.linear_schedule(d.timesteps, d.beta_start, d.beta_end)


def apply_fn(model: UNet):
  """(params, x, t, *, train, rngs, cond) -> prediction: the signature the diffusion math uses."""

  def apply(params, x, t, *, train, rngs, cond):
    return model.apply({"params": params}, x, t, cond=cond, train=train, rngs=rngs)

  return apply


def init_state(config, model: UNet, rng: jax.Array, *, train_config=None, conditional: bool = False) -> TrainState:
  """Fresh state at config.data.image_size; `conditional` adds G_SR's condition input."""
  t = train_config or config.train
  size = config.data.image_size
  x = jnp.zeros((1, size, size, joint_channels(config)), jnp.float32)
  params = model.init(rng, x, jnp.zeros((1,), jnp.int32), cond=x if conditional else None)["params"]
  tx, _ = optim.make_optimizer(t)
  return TrainState.create(params, tx, rng, ema_decay=t.ema_decay)


def train_step(state: TrainState, batch, *, model: UNet, sched: schedule.Schedule, prediction: str,
               lr_schedule) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch {"x": [B, S, S, C]} (+ "cond" for G_SR; only x is noised)."""

  def loss_fn(params):
    return schedule.diffusion_loss(apply_fn(model), params, sched, batch["x"], state.step_rng(),
                                   prediction=prediction, train=True, cond=batch.get("cond"))

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  per_channel = aux["loss_per_channel"]
  metrics = {"loss": loss, "loss_image": jnp.mean(per_channel[:3]),
             "grad_norm": optax.tree.norm(grads),
             "lr": lr_schedule(state.step)}
  if per_channel.shape[0] > 3:
    metrics["loss_label"] = jnp.mean(per_channel[3:])
  return state.apply_gradients(grads), metrics


def make_generate_fn(config, model: UNet, mesh, num: int, *, sampler: str, ddim_steps: int = 50,
                     ddim_eta: float = 0.0):
  """Jitted (params, rng) -> joint samples [num, S, S, C] in [-1, 1], batch-sharded on `mesh`.

  The whole reverse process runs inside one program (lax.scan over timesteps).
  """
  sched = make_schedule(config)
  size = config.data.image_size
  shape = (num, size, size, joint_channels(config))
  sharding = parallel.batch_sharding(mesh)
  prediction = config.diffusion.prediction
  if sampler not in ("ddpm", "ddim"):
    raise ValueError(f"config.sample.sampler={sampler!r}: must be 'ddpm' or 'ddim'")

  def generate(params, rng):
    denoise = sampling.make_denoise_fn(apply_fn(model), params)
    if sampler == "ddpm":
      return sampling.sample_ddpm(denoise, sched, shape, rng, prediction=prediction, sharding=sharding)
    return sampling.sample_ddim(denoise, sched, shape, rng, num_steps=ddim_steps, eta=ddim_eta,
                                prediction=prediction, sharding=sharding)

  return jax.jit(generate, out_shardings=sharding)


def decode_samples(config, joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Joint samples in [-1, 1] -> (uint8 images, class masks) via the nearest valid label code.

  The image-only baseline has no label channels: its masks are all no-data.
  """
  dtype = np.uint16 if config.data.num_classes > 255 else np.uint8
  if not config.diffusion.joint_labels:
    image = np.round(labels.from_signed(np.asarray(joint)) * 255.0).astype(np.uint8)
    return image, np.full(image.shape[:-1], config.data.ignore_index, dtype)
  image, mask = labels.decode_pair(np.asarray(joint), config.data.num_classes, config.data.label_encoding)
  return image, mask.astype(dtype)


def sample_grid(config, images: np.ndarray, masks: np.ndarray, title: str):
  d = config.data
  return viz.pair_grid(images, masks, d.palette, d.ignore_index, tile_size=max(96, d.image_size),
                       class_names=d.class_names, title=title)


def _preview(config, model, mesh, workdir, writer_enabled: bool):
  """Every train.sample_every steps: a DDIM grid from the EMA params, as PNG (process 0)."""
  num = config.train.num_grid_samples
  num += (-num) % mesh.size  # pad to a multiple of the devices; extra samples are dropped
  generate = make_generate_fn(config, model, mesh, num, sampler="ddim",
                              ddim_steps=min(config.train.grid_sampler_steps, config.diffusion.timesteps))

  def preview(state: TrainState, step: int):
    joint = parallel.to_host(generate(state.eval_params, jax.random.key(config.seed)))
    if writer_enabled:
      images, masks = decode_samples(config, joint[:config.train.num_grid_samples])
      name = model_name(config)
      path = os.path.join(workdir, "samples", f"{name}_step{step:08d}.png")
      viz.save_png(sample_grid(config, images, masks, f"{name}: EMA samples at step {step}"), path)
      logging.info("wrote %s", path)

  return preview


def _batches(config, real_dir: str, batch: int):
  batches = pipeline.diffusion_batches(config, real_dir, batch_size=batch, seed=config.seed)
  if not config.diffusion.joint_labels:  # image-only baseline: drop the label channels
    batches = batches.map(lambda b: {"x": b["x"][..., :3]})
  return iter(batches)


def make_task(config, workdir: str, mesh) -> loop.Task:
  model = make_model(config)
  sched = make_schedule(config)
  _, lr_schedule = optim.make_optimizer(config.train)
  real_dir = os.path.join(workdir, "data", "train")
  batch = parallel.per_process_batch_size(config.train.batch_size, "train.batch_size", mesh)
  return loop.Task(
      name=model_name(config),
      init=functools.partial(init_state, config, model),
      step=functools.partial(train_step, model=model, sched=sched, prediction=config.diffusion.prediction,
                             lr_schedule=lr_schedule),
      make_batches=functools.partial(_batches, config, real_dir, batch),
      preview=_preview(config, model, mesh, workdir, jax.process_index() == 0),
  )


def run(config, workdir: str) -> TrainState:
  """--mode=train_diffusion: train G on <workdir>/data/train, resuming from its last checkpoint."""
  mesh = parallel.make_mesh()
  return loop.train(make_task(config, workdir, mesh), config.train, workdir, seed=config.seed, mesh=mesh)
