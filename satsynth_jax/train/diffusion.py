"""G's training task (jobs/train_diffusion.py runs it): the joint image+mask DDPM on the real train split.

The model, schedule and sampler live in generator.py (shared with inference); this module
holds the loss step, the input batches and the periodic preview grid, and builds the loop's
Task of any diffusion U-Net (G here, G_SR in train/super_resolution.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from satsynth_jax import generator, resolved
from satsynth_jax.data import pipeline, records
from satsynth_jax.diffusion import guidance, schedule
from satsynth_jax.infra import parallel, viz, workdir as layout
from satsynth_jax.models.unet import UNet
from satsynth_jax.train import loop, optim
from satsynth_jax.train.state import TrainState


def init_state(model: UNet, size: int, channels: int, t, rng: jax.Array, *, conditional: bool = False) -> TrainState:
  """Fresh state of a U-Net at size x size x channels with the optimizer of train section `t`."""
  params = generator.init_params(model, size, channels, rng, conditional=conditional)
  tx, _ = optim.make_optimizer(t)
  return TrainState.create(params, tx, rng, ema_decay=t.ema_decay)


def train_step(state: TrainState, batch, *, model: UNet, sched: schedule.Schedule, prediction: str,
               lr_schedule, weighting: str = "uniform", min_snr_gamma: float = 5.0,
               condition_dropout: float = 0.0) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch {"x": [B, S, S, C]} (+ "cond" for G_SR, + "presence" [B, K] for a
  presence-conditioned G, each row's condition dropped with prob `condition_dropout`; only x is noised)."""
  rng = state.step_rng()
  inputs = {}
  if "presence" in batch:
    keep = guidance.keep_mask(jax.random.fold_in(rng, 1), batch["x"].shape[0], condition_dropout)
    inputs["presence"] = guidance.presence_code(batch["presence"], keep)

  def loss_fn(params):
    return schedule.diffusion_loss(generator.apply_fn(model), params, sched, batch["x"], rng,
                                   prediction=prediction, train=True, cond=batch.get("cond"), weighting=weighting,
                                   min_snr_gamma=min_snr_gamma, self_condition=model.self_condition,
                                   pixel_weights=batch.get("weights"), **inputs)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  per_channel = aux["loss_per_channel"]
  metrics = {"loss": loss, "loss_image": jnp.mean(per_channel[:3]),
             "grad_norm": optax.tree.norm(grads),
             "lr": lr_schedule(state.step)}
  if per_channel.shape[0] > 3:
    metrics["loss_label"] = jnp.mean(per_channel[3:])
  return state.apply_gradients(grads), metrics


def _preview(config, model, mesh, workdir):
  """Every diffusion.train.sample_every steps: a DDIM grid from the EMA params, as PNG (process 0)."""
  t = config.diffusion.train
  num = t.num_grid_samples + (-t.num_grid_samples) % mesh.size  # extra samples are dropped
  generate = generator.make_generate_fn(config, model, mesh, num, sampler="ddim",
                                        ddim_steps=min(t.grid_sampler_steps, config.diffusion.timesteps))
  name = resolved.g_run(config)

  def preview(state: TrainState, step: int):
    joint = parallel.to_host(generate(state.eval_params, jax.random.key(config.seed)))
    if jax.process_index() == 0:
      images, masks = generator.decode_samples(config, joint[:t.num_grid_samples], np.random.default_rng(step))
      path = viz.save_png(generator.sample_grid(config, images, masks, f"{name}: EMA samples at step {step}"),
                          layout.samples_path(workdir, f"{name}_step{step:08d}.png"))
      logging.info("wrote %s", path)

  def compile_sampler(state_shapes) -> None:
    generate.lower(state_shapes.eval_params, jax.random.key(config.seed)).compile()

  return preview, compile_sampler


def class_weights(config, class_pixels) -> np.ndarray | None:
  """Per-class pixel weights of G's loss: class c weighs f_c^(-diffusion.class_weight_power) (f_c its share
  of the train split's labelled pixels), scaled so the train pixels' mean weight is 1; a class the split
  lacks gets 1. None for power 0 (the paper: every pixel alike)."""
  power = config.diffusion.class_weight_power
  if power == 0:
    return None
  pixels = np.asarray(class_pixels, np.float64)
  share = pixels / pixels.sum()
  raw = np.ones_like(share)
  raw[pixels > 0] = share[pixels > 0] ** -power
  return (raw / np.sum(share * raw)).astype(np.float32)


def _batches(config, workdir, batch: int):
  train_dir = layout.data_dir(workdir, "train")
  weights = class_weights(config, records.read_manifest(train_dir)["class_pixels"])
  batches = pipeline.diffusion_batches(config, train_dir, batch_size=batch, seed=config.seed,
                                       presence=resolved.conditioned(config), class_weights=weights)
  if not config.diffusion.joint_labels:  # image-only baseline: drop the label channels
    batches = batches.map(lambda b: {**b, "x": b["x"][..., :3]})
  return iter(batches)


def step_fn(config, model: UNet, t):
  """train_step bound to a diffusion model's settings (G's, or G_SR's with its train section `t`)."""
  f = config.diffusion
  _, lr_schedule = optim.make_optimizer(t)
  return functools.partial(train_step, model=model, sched=generator.make_schedule(config), prediction=f.prediction,
                           lr_schedule=lr_schedule, weighting=f.loss_weighting, min_snr_gamma=f.min_snr_gamma,
                           condition_dropout=f.condition_dropout)


def make_task(config, workdir, mesh) -> loop.Task:
  """The loop's task for G."""
  return diffusion_task(config, workdir, mesh, section="diffusion", name=resolved.g_run(config),
                        model=generator.build_g(config), size=config.data.image_size,
                        batches=functools.partial(_batches, config, workdir), preview=_preview,
                        shaping=generator.g_shaping)


def diffusion_task(config, workdir, mesh, *, section: str, name: str, model: UNet, size: int, batches, preview,
                   shaping, conditional: bool = False) -> loop.Task:
  """The loop's task for a diffusion U-Net trained with config.<section>.train (G's or G_SR's): `batches(batch)`
  gives the per-process batch iterator, `preview(config, model, mesh, workdir)` the grid writer and the
  function compiling its sampler, `shaping(config, workdir)` the run's identity; `conditional` adds G_SR's
  condition input."""
  t = config[section].train
  batch = parallel.per_process_batch_size(t.batch_size, f"{section}.train.batch_size", mesh)
  grid, compile_sampler = preview(config, model, mesh, workdir) if t.sample_every else (None, None)
  return loop.Task(
      name=name,
      init=functools.partial(init_state, model, size, generator.joint_channels(config), t, conditional=conditional),
      step=step_fn(config, model, t),
      make_batches=functools.partial(batches, batch),
      preview=grid,
      warm_up=compile_sampler,
      config=config,
      shaping=functools.partial(shaping, config, workdir),
  )
