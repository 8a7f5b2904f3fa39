"""U-Net segmenter on a ResNet encoder; its encoder features drive FID, sFID and IS.

The paper scores samples not with Inception but with a ResNet-50 U-Net segmentation
model trained on the real data: FID on pooled encoder features, sFID on a spatial
encoder map, IS on the segmentation logits. The decoder follows the common U-Net-on-ResNet
layout: from C5, five x2 upsampling blocks (concat the skip C4, C3, C2, C1, then none),
each two conv3x3+BatchNorm+ReLU, then a conv3x3 classifier at full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from satsynth_jax.models import resnet
from satsynth_jax.models.fpn import resize_to

DECODER_CHANNELS = (256, 128, 64, 32, 16)
SKIPS = ("C4", "C3", "C2", "C1", None)  # None: the last block reaches the input size without a skip


class DecoderBlock(nn.Module):
  """Nearest upsampling to `size`, concat the skip (if any), two conv3x3+BN+ReLU."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, size: Sequence[int], train: bool) -> jax.Array:
    x = resize_to(x, size, "nearest")
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    for i in range(2):
      x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=resnet.CONV_INIT, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(resnet.batch_norm(train, f"bn{i}", self.dtype)(x))
    return x


class UNetSegmenter(nn.Module):
  """ResNet encoder + U-Net decoder: images [B, H, W, 3] in [0, 1] -> float32 logits [B, H, W, K].

  With `return_features=True` also returns the sample metrics' encoder features
  (resnet.metric_features: "pooled" for FID, "spatial" for sFID).
  The encoder is the submodule "backbone" (see `resnet.load_pretrained`).
  """

  num_classes: int
  backbone_stages: Sequence[int] = resnet.RESNET50_STAGES
  dtype: Any = jnp.float32
  base_width: int = resnet.RESNET50_WIDTH  # scales the encoder and the decoder
  spatial_level: str = "C3"
  spatial_channels: int = 7

  @nn.compact
  def __call__(self, images: jax.Array, train: bool, return_features: bool = False):
    features = resnet.ResNet(self.backbone_stages, self.dtype, self.base_width, name="backbone")(images, train)
    x = features["C5"]
    for i, (channels, skip_name) in enumerate(zip(DECODER_CHANNELS, SKIPS)):
      skip = features[skip_name] if skip_name else None
      size = skip.shape[1:3] if skip is not None else images.shape[1:3]
      channels = max(8, channels * self.base_width // resnet.RESNET50_WIDTH)
      x = DecoderBlock(channels, self.dtype, name=f"decoder{i}")(x, skip, size, train)
    logits = nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     name="classifier")(x).astype(jnp.float32)
    if not return_features:
      return logits
    return logits, resnet.metric_features(features, self.spatial_level, self.spatial_channels)
