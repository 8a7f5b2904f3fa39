"""Inference for G and G_SR: build the U-Nets, generate / upsample (one sampler dispatch), decode, restore.

G is the joint image+mask DDPM: its U-Net sees concat(image, label code) in [-1, 1]
(labels.encode_pair). G_SR is the same U-Net at `sr.image_size`, conditioned at every step
on G's pair upsampled (diffusion/conditioning.py); the cascade is (x, y) = G_SR(z1, G(z0)).
Both share `config.diffusion`'s noise schedule and prediction target. Inference restores
only the EMA weights a checkpoint stores for it (infra/checkpoint.py), never an optimizer, and
builds the model from the config recorded beside the run (infra/identity.py), so sampling needs
none of the overrides the model was trained with.

Run names carry the paper's ablation axes and G's conditioning, so Table 1 and Table 3 live
side by side in one workdir: "diffusion" (eps prediction, bit labels, joint), "diffusion_x0",
"diffusion_v", "diffusion_onehot", "diffusion_x0_onehot", "diffusion_image_only",
"diffusion_x0_presence" (class-presence conditioned); G_SR likewise ("super_resolution", ...).
Any other setting that shapes a model (U-Net width, image size, schedule, self-conditioning,
loss weighting) is recorded and a run made with other values is refused, never silently reused.

A class-presence conditioned G (diffusion.condition="presence") samples conditionally, with
classifier-free guidance at sample.guidance, from the presence vectors of a sampling plan
(presence.py), or unconditionally; synthetic set names say which plan drew them.

Training (train/diffusion.py, train/super_resolution.py) builds its models here too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from satsynth_jax import labels, resolved
from satsynth_jax.data import splits
from satsynth_jax.diffusion import conditioning, guidance, sampling, schedule
from satsynth_jax.infra import checkpoint, identity, parallel, viz, workdir as layout
from satsynth_jax.models.unet import UNet, unet_from_config

# Settings that shape G (and, with the SR ones, G_SR): a run made with other values is refused.
G_SHAPING = ("seed", "dtype", "data.augment", "data.resize", "data.num_classes", "data.ignore_index",
             "data.label_encoding", "data.no_data_code",
             "data.ignore_fill_class", "data.image_size", "diffusion.timesteps", "diffusion.beta_start",
             "diffusion.beta_end", "diffusion.prediction", "diffusion.joint_labels", "diffusion.self_condition",
             "diffusion.loss_weighting", "diffusion.min_snr_gamma", "diffusion.class_weight_power",
             "diffusion.condition", "diffusion.condition_dropout", "diffusion.model")
# G_SR's loss weighs every pixel alike (class weights shape G's loss only).
SR_SHAPING = tuple(key for key in G_SHAPING if key != "diffusion.class_weight_power") + ("sr.image_size", "sr.model")
# Training settings that do not change what a run learns, or that a resumed run may extend.
UNSHAPING_TRAIN_KEYS = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                        "num_grid_samples", "grid_sampler_steps")


def train_shaping(config, section: str) -> dict:
  """A train section's settings that shape the weights (all but num_steps and logging cadence)."""
  values = identity.select(config, [section])
  return {k: v for k, v in values.items() if k.rsplit(".", 1)[1] not in UNSHAPING_TRAIN_KEYS}


def g_shaping(config, workdir=None) -> dict:
  """The settings that shape G; with `workdir`, also what its prepared train split is (splits.data_identity)."""
  return {**identity.select(config, G_SHAPING), **train_shaping(config, "diffusion.train"), **data_shaping(workdir)}


def sr_shaping(config, workdir=None) -> dict:
  """The settings that shape G_SR; with `workdir`, also what its prepared train split is."""
  return {**identity.select(config, SR_SHAPING), **train_shaping(config, "sr.train"), **data_shaping(workdir)}


def data_shaping(workdir) -> dict:
  """The identity of the workdir's prepared train split (splits.data_identity); {} for the settings alone
  (workdir None, e.g. a set's record of its generator's settings)."""
  return splits.data_identity(workdir) if workdir is not None else {}


def no_data_index(config) -> int | None:
  """The mask value G's no-data code decodes to; None when the codec has none (data.no_data_code=False)."""
  return config.data.ignore_index if config.data.no_data_code else None


def joint_channels(config) -> int:
  """Channels of G's (and G_SR's) samples: RGB plus the label code (none for the image-only baseline)."""
  if not config.diffusion.joint_labels:
    return 3
  return 3 + labels.num_label_channels(config.data.num_classes, config.data.label_encoding,
                                       ignore_index=no_data_index(config))


def sr_factor(config) -> int:
  """sr.image_size / data.image_size (config_check makes it an integer >= 2)."""
  return config.sr.image_size // config.data.image_size


def build_g(config) -> UNet:
  return unet_from_config(config.diffusion.model, joint_channels(config), config.dtype,
                          self_condition=config.diffusion.self_condition,
                          presence_classes=config.data.num_classes if resolved.conditioned(config) else 0)


def build_sr(config) -> UNet:
  return unet_from_config(config.sr.model, joint_channels(config), config.dtype,
                          self_condition=config.diffusion.self_condition)


def make_schedule(config) -> schedule.Schedule:
  d = config.diffusion
  return schedule.linear_schedule(d.timesteps, d.beta_start, d.beta_end)


def apply_fn(model: UNet):
  """(params, x, t, *, train, rngs, cond, [self_cond, presence]) -> prediction: the diffusion maths' signature."""

  def apply(params, x, t, *, train, rngs, cond, **inputs):
    return model.apply({"params": params}, x, t, cond=cond, train=train, rngs=rngs, **inputs)

  return apply


def init_params(model: UNet, size: int, channels: int, rng: jax.Array, *, conditional: bool = False):
  """Fresh U-Net params at size x size x channels; `conditional` adds G_SR's condition input."""
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  return model.init(rng, x, jnp.zeros((1,), jnp.int32), cond=x if conditional else None)["params"]


def make_generate_fn(config, model: UNet, mesh, num: int, *, sampler: str, ddim_steps: int = 50,
                     ddim_eta: float = 0.0, guidance_scale: float = 0.0):
  """Jitted (params, rng[, presence]) -> G's joint samples [num, s, s, C] in [-1, 1], batch-sharded on `mesh`.

  `presence` [num, K] in {0, 1} (a conditioned G only) asks for the classes of each sample, with
  classifier-free guidance at `guidance_scale`; without it a conditioned G samples unconditionally.
  The whole reverse process runs inside one program (lax.scan over timesteps).
  """
  size = config.data.image_size
  shape = (num, size, size, joint_channels(config))
  sharding = parallel.batch_sharding(mesh)
  run = functools.partial(sampling.sample, sched=make_schedule(config), shape=shape, sampler=sampler,
                          ddim_steps=ddim_steps, ddim_eta=ddim_eta, prediction=config.diffusion.prediction,
                          self_condition=config.diffusion.self_condition, sharding=sharding)
  apply = apply_fn(model)

  def generate(params, rng, presence=None):
    if presence is None:
      return run(sampling.make_denoise_fn(apply, params), rng=rng)

    def denoise_with(code, x, t, x0_prev):
      return sampling.make_denoise_fn(apply, params, presence=code)(x, t, x0_prev)

    return run(guidance.guided_denoise_fn(denoise_with, guidance.presence_code(presence), guidance_scale), rng=rng)

  return jax.jit(generate, out_shardings=sharding)


def make_upsample_fn(config, model: UNet, mesh, num: int, *, sampler: str, ddim_steps: int = 50,
                     ddim_eta: float = 0.0):
  """Jitted (params, rng, low-res joint [num, s, s, C]) -> high-res joint [num, S, S, C] in [-1, 1].

  The cascade's second stage: the low-res pair (G's output or any joint pair in [-1, 1]) at
  s = data.image_size becomes the condition (labels snapped to valid classes); S = sr.image_size.
  """
  d = config.data
  factor = sr_factor(config)
  channels = joint_channels(config)
  size = config.sr.image_size
  sharding = parallel.batch_sharding(mesh)
  run = functools.partial(sampling.sample, sched=make_schedule(config), shape=(num, size, size, channels),
                          sampler=sampler, ddim_steps=ddim_steps, ddim_eta=ddim_eta,
                          prediction=config.diffusion.prediction, self_condition=config.diffusion.self_condition,
                          sharding=sharding)

  def upsample(params, rng, low_res_joint):
    expected = (num, d.image_size, d.image_size, channels)
    if low_res_joint.shape != expected:
      raise ValueError(f"low-res joint has shape {low_res_joint.shape}, expected {expected}")
    cond = conditioning.upsample_condition(low_res_joint, factor, d.num_classes, d.label_encoding,
                                           ignore_index=no_data_index(config), rng=jax.random.fold_in(rng, 1))
    cond = jax.lax.with_sharding_constraint(cond, sharding)
    return run(sampling.make_denoise_fn(apply_fn(model), params, cond), rng=rng)

  return jax.jit(upsample, out_shardings=sharding)


def decode_samples(config, joint: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Joint samples in [-1, 1] -> (uint8 images, masks) by labels.decode_pair's rule: the nearest
  valid code (a class, or no-data with data.no_data_code), exact ties broken by `rng`.

  The image-only baseline has no label channels: its masks are all no-data.
  """
  dtype = np.uint16 if config.data.num_classes > 255 else np.uint8
  if not config.diffusion.joint_labels:
    image = np.round(labels.from_signed(np.asarray(joint)) * 255.0).astype(np.uint8)
    return image, np.full(image.shape[:-1], config.data.ignore_index, dtype)
  image, mask = labels.decode_pair(np.asarray(joint), config.data.num_classes, config.data.label_encoding,
                                   ignore_index=no_data_index(config), rng=rng)
  return image, mask.astype(dtype)


def sample_grid(config, images: np.ndarray, masks: np.ndarray, title: str, **kwargs):
  """PNG-ready grid of pairs, each image beside its coloured mask."""
  d = config.data
  tile = max(96, int(images.shape[1]))
  return viz.pair_grid(images, masks, d.palette, d.ignore_index, tile_size=tile, class_names=d.class_names,
                       title=title, **kwargs)


def trained_config(config, workdir, run: str):
  """The config G's or G_SR's run `run` was trained with (recorded beside it), else `config` itself (no run).

  Inference builds models from it, so sampling needs none of the training overrides. A run trained on
  other prepared data than the workdir's, or whose config.json is damaged or gone, is refused.
  """
  directory = layout.checkpoint_dir(workdir, run)
  recorded = identity.read_existing(directory, f"checkpoints of run {run!r}")
  if recorded is None:
    return config
  identity.compare(directory, splits.made_from(recorded["shaping"]), splits.data_identity(workdir),
                   f"run {run!r}", f"it was trained on other prepared data: retrain it (delete {directory}), or "
                   "use the workdir it was trained in")
  return identity.recorded_config(directory)


def _missing_hint(workdir, run: str, mode: str) -> str:
  """How to make the missing run, naming the runs of its kind the workdir does hold."""
  parent = layout.checkpoint_dir(workdir, run).parent
  kind = run.split("_")[0]
  others = sorted(p.name for p in parent.glob(f"{kind}*") if p.is_dir()) if parent.is_dir() else []
  hint = f"run --mode={mode} first"
  if others:
    hint += (f" (this workdir holds {', '.join(others)}; the run name follows diffusion.prediction, "
             "data.label_encoding and diffusion.joint_labels)")
  return hint


def restore_g(config, workdir, mesh, step: int | None = None):
  """(G's trained config, model, EMA params replicated on `mesh`, checkpoint step); step None/-1: latest."""
  return _restore(config, workdir, mesh, step, run=resolved.g_run(config), mode="train_diffusion", build=build_g,
                  size=lambda trained: trained.data.image_size, conditional=False)


def restore_sr(config, workdir, mesh, step: int | None = None):
  """(G_SR's trained config, model, EMA params replicated on `mesh`, checkpoint step)."""
  return _restore(config, workdir, mesh, step, run=resolved.sr_run(config), mode="train_sr", build=build_sr,
                  size=lambda trained: trained.sr.image_size, conditional=True)


@functools.lru_cache(maxsize=8)
def abstract_params(model: UNet, size: int, channels: int, conditional: bool):
  """Shapes and dtypes of init_params, traced once per model and size (each set an experiment samples
  restores the same G)."""
  return jax.eval_shape(functools.partial(init_params, model, size, channels, conditional=conditional),
                        jax.random.key(0))


def _restore(config, workdir, mesh, step, *, run: str, mode: str, build, size, conditional: bool):
  """Build run `run` from the config it was trained with and restore its EMA params (`mode` trains it)."""
  config = trained_config(config, workdir, run)
  model = build(config)
  abstract = {"params": abstract_params(model, size(config), joint_channels(config), conditional)}
  variables, step = checkpoint.restore_inference(layout.checkpoint_dir(workdir, run), abstract, mesh, step,
                                                 hint=_missing_hint(workdir, run, mode))
  return config, model, variables["params"], step
