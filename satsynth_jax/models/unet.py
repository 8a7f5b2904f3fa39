"""DDPM U-Net (Ho et al. 2020, appendix B) in Flax Linen, NHWC.

The layout follows the paper's reference network: a sinusoidal timestep embedding and
a 2-layer MLP; at each resolution `num_res_blocks` residual blocks (with single-head
self-attention at `attn_resolutions`), a stride-2 conv between levels; a middle of
res-attn-res; a mirrored decoder with one extra block per level that consumes every
encoder activation as a skip connection; GroupNorm-SiLU-conv to the output.

`dtype` is the compute dtype (float32 or bfloat16). Parameters stay float32, and
GroupNorm statistics and the attention softmax run in float32 so bfloat16 compute
does not lose precision where it matters.

The super-resolution generator uses the same network with `cond` (the upsampled
low-resolution pair) concatenated to the noisy input on the channel axis. Two optional
inputs serve G: `self_cond` (Analog Bits' self-conditioning: the previous x0 estimate,
concatenated likewise) and `presence` (a class-presence code, diffusion/guidance.py,
embedded and added to the time embedding; all zeros means "no condition").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from satsynth_jax.models import layers

NUM_GROUPS = 32  # GroupNorm groups, as in the reference network
COMPUTE_DTYPES = ("float32", "bfloat16")

# The reference initialises every conv/dense with fan-avg uniform variance scaling and
# the last layer of each residual branch (and the output conv) at zero, so every block
# starts as the identity and the untrained network predicts zero.
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nn.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Integer timesteps [B] -> sinusoidal features [B, dim] (float32), as in the reference."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _group_norm(name: str, *, act: bool = False) -> layers.GroupNorm:
  """GroupNorm (float32 statistics and output), with the SiLU that follows it fused when `act`."""
  return layers.GroupNorm(num_groups=NUM_GROUPS, epsilon=1e-6, act=act, name=name)


# How the first and last convolutions see beyond the image's edge: "zeros" (the reference's) or
# "reflect". Zeros read as mid-grey outside every pair, and a briefly trained G draws that as a frame
# two pixels inside each image; reflecting these two edges weakens it for two pads (the inner
# convolutions' zero padding still draws a fainter one; benchmarks/edge_profile.py measures it).
EDGE_PADDINGS = {"zeros": "SAME", "reflect": "REFLECT"}


def _conv(features: int, dtype: Any, name: str, *, strides: int = 1, zero: bool = False,
          padding: str = "SAME") -> nn.Conv:
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=padding, dtype=dtype,
                 kernel_init=_zero_init if zero else _default_init, name=name)


def _dense(features: int, dtype: Any, name: str, *, zero: bool = False) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_zero_init if zero else _default_init, name=name,
                  dot_general=layers.dot_general)


class ResBlock(nn.Module):
  """GN-SiLU-conv, + time projection, GN-SiLU-dropout-conv, residual (1x1 when widths differ).

  With `scale_shift` (ADM, Dhariwal & Nichol 2021) the time embedding scales and shifts the
  normalised features instead of being added before the norm. The reference's addition only
  survives GroupNorm when a group holds several channels: at 32 channels in 32 groups the norm
  subtracts each channel's mean, so an added per-channel constant (time, class presence) is erased.
  """

  features: int
  dropout: float
  dtype: Any
  scale_shift: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = _conv(self.features, self.dtype, "conv1")(_group_norm("norm1", act=True)(x))
    emb = _dense(self.features * (2 if self.scale_shift else 1), self.dtype, "time_proj")(nn.silu(temb))
    if self.scale_shift:
      h = _group_norm("norm2", act=True)(h, modulation=jnp.split(emb, 2, axis=-1))
    else:
      h = _group_norm("norm2", act=True)(h + emb[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.features, self.dtype, "conv2", zero=True)(h)
    if x.shape[-1] != self.features:
      x = _dense(self.features, self.dtype, "shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all pixels, with a residual connection."""

  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = _group_norm("norm")(x)
    q, k, v = (_dense(c, self.dtype, name)(h).reshape(b, hgt * wid, c) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
    return x + _dense(c, self.dtype, "proj_out", zero=True)(h)


class UNet(nn.Module):
  """eps/x0 predictor: (x_t [B,H,W,C], t [B] int) -> [B,H,W,out_channels] float32.

  Attributes:
    ch: base width; level i has ch * ch_mult[i] channels (each a multiple of 32).
    ch_mult: width multiplier per resolution level; len(ch_mult) - 1 downsamplings.
    num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
    attn_resolutions: feature-map heights (pixels) that get a self-attention block.
    dropout: dropout rate inside residual blocks (active only with train=True).
    out_channels: channels of the prediction (the input's channels for eps/x0/v).
    dtype: compute dtype; params are float32, GroupNorm and softmax run in float32.
    self_condition: the input also takes `self_cond` (x's shape; zeros when not given).
    presence_classes: K > 0 adds a class-presence embedding for `presence` codes [B, K].
    scale_shift: residual blocks take the time embedding as ADM's scale and shift (ResBlock).
    edge_padding: the input and output convolutions' padding, a key of EDGE_PADDINGS.
  """

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  out_channels: int
  dtype: Any = jnp.float32
  self_condition: bool = False
  presence_classes: int = 0
  scale_shift: bool = False
  edge_padding: str = "zeros"

  def _check_input(self, x: jax.Array, t: jax.Array, cond: jax.Array | None) -> None:
    if x.ndim != 4:
      raise ValueError(f"UNet expects NHWC input, got shape {x.shape}")
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet input {x.shape[1]}x{x.shape[2]} must be divisible by {factor} "
                       f"(ch_mult={self.ch_mult} halves it {len(self.ch_mult) - 1} times)")
    if t.shape != (x.shape[0],):
      raise ValueError(f"UNet timesteps must have shape ({x.shape[0]},), got {t.shape}")
    if cond is not None and cond.shape[:3] != x.shape[:3]:
      raise ValueError(f"UNet cond shape {cond.shape} must match the input's batch and "
                       f"spatial shape {x.shape[:3]}")
    for mult in self.ch_mult:
      if (self.ch * mult) % NUM_GROUPS:
        raise ValueError(f"UNet width ch * ch_mult = {self.ch} * {mult} must be a multiple of "
                         f"{NUM_GROUPS} (GroupNorm groups)")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, cond: jax.Array | None = None,
               self_cond: jax.Array | None = None, presence: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    self._check_input(x, t, cond)
    if self.self_condition:
      x = jnp.concatenate([x, jnp.zeros_like(x) if self_cond is None else self_cond.astype(x.dtype)], axis=-1)
    elif self_cond is not None:
      raise ValueError("self_cond given to a U-Net built without self_condition")
    if cond is not None:
      x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)

    temb = timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, self.dtype, "time_dense0")(temb)
    if self.presence_classes:
      if presence is None:  # unconditional: the all-zeros code
        presence = jnp.zeros((x.shape[0], self.presence_classes), jnp.float32)
      if presence.shape != (x.shape[0], self.presence_classes):
        raise ValueError(f"UNet presence must have shape ({x.shape[0]}, {self.presence_classes}), "
                         f"got {presence.shape}")
      temb = temb + _dense(4 * self.ch, self.dtype, "presence_dense")(presence.astype(self.dtype))
    elif presence is not None:
      raise ValueError("presence given to a U-Net built without presence_classes")
    temb = _dense(4 * self.ch, self.dtype, "time_dense1")(nn.silu(temb))

    def res_block(h, features, name):
      return ResBlock(features, self.dropout, self.dtype, self.scale_shift, name=name)(h, temb, train)

    def maybe_attn(h, name):
      return AttnBlock(self.dtype, name=name)(h) if h.shape[1] in self.attn_resolutions else h

    if self.edge_padding not in EDGE_PADDINGS:
      raise ValueError(f"UNet edge_padding must be one of {tuple(EDGE_PADDINGS)}, got {self.edge_padding!r}")
    edge = EDGE_PADDINGS[self.edge_padding]
    h = _conv(self.ch, self.dtype, "conv_in", padding=edge)(x)
    skips = [h]
    last = len(self.ch_mult) - 1
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(h, self.ch * mult, f"down{level}_res{i}")
        h = maybe_attn(h, f"down{level}_attn{i}")
        skips.append(h)
      if level != last:
        h = _conv(h.shape[-1], self.dtype, f"down{level}_downsample", strides=2)(h)
        skips.append(h)

    h = res_block(h, h.shape[-1], "mid_res0")
    h = AttnBlock(self.dtype, name="mid_attn")(h)
    h = res_block(h, h.shape[-1], "mid_res1")

    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, self.ch * self.ch_mult[level], f"up{level}_res{i}")
        h = maybe_attn(h, f"up{level}_attn{i}")
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        h = _conv(h.shape[-1], self.dtype, f"up{level}_upsample")(h)

    h = _group_norm("norm_out", act=True)(h)
    h = _conv(self.out_channels, self.dtype, "conv_out", zero=True, padding=edge)(h)
    return h.astype(jnp.float32)


def unet_from_config(model_cfg, out_channels: int, dtype: Any, *, self_condition: bool = False,
                     presence_classes: int = 0) -> UNet:
  """UNet from `config.model` (ch, ch_mult, num_res_blocks, attn_resolutions, dropout, scale_shift, edge_padding).

  `dtype` is the compute dtype, a name ("float32", "bfloat16") or a jnp dtype.
  """
  name = jnp.dtype(dtype).name
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"UNet compute dtype {dtype!r} must be one of {COMPUTE_DTYPES}")
  return UNet(
      ch=int(model_cfg.ch),
      ch_mult=tuple(int(m) for m in model_cfg.ch_mult),
      num_res_blocks=int(model_cfg.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in model_cfg.attn_resolutions),
      dropout=float(model_cfg.dropout),
      out_channels=int(out_channels),
      dtype=jnp.dtype(name),
      self_condition=bool(self_condition),
      presence_classes=int(presence_classes),
      scale_shift=bool(model_cfg.scale_shift),
      edge_padding=str(model_cfg.edge_padding),
  )
