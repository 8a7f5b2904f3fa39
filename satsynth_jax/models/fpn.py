"""Semantic FPN segmenter (Kirillov et al. 2019, Panoptic FPN's semantic branch) on ResNet.

ResNet C2..C5 -> FPN P2..P5 (256 ch) -> per level, conv3x3(128)+GroupNorm+ReLU stages with
x2 upsampling until stride 4 -> sum -> 1x1 conv to K -> bilinear to the input size. This
is the "FPN" segmenter of the paper's Table 1.

Upsampling resizes to the finer level's exact shape rather than doubling, so inputs whose
sides are not multiples of 32 work (the torch-style strided convs round sizes up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from satsynth_jax.models import layers, resnet

LEVELS = (2, 3, 4, 5)


def resize_to(x: jax.Array, size: Sequence[int], method: str) -> jax.Array:
  """Resize NHWC `x` to spatial `size` (jax.image uses half-pixel centres, as torch's align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method)


class FPN(nn.Module):
  """Lateral 1x1 convs, top-down nearest upsampling + add, 3x3 output convs: C2..C5 -> P2..P5."""

  channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    laterals = {level: nn.Conv(self.channels, (1, 1), kernel_init=resnet.CONV_INIT, dtype=self.dtype,
                               name=f"lateral{level}", conv_general_dilated=layers.conv_general_dilated)(
                                   features[f"C{level}"])
                for level in LEVELS}
    merged = {LEVELS[-1]: laterals[LEVELS[-1]]}
    for level in reversed(LEVELS[:-1]):
      coarser = merged[level + 1]
      merged[level] = laterals[level] + resize_to(coarser, laterals[level].shape[1:3], "nearest")
    return {f"P{level}": nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                                 kernel_init=resnet.CONV_INIT, dtype=self.dtype, name=f"output{level}",
                                 conv_general_dilated=layers.conv_general_dilated)(merged[level])
            for level in LEVELS}


class SemanticHead(nn.Module):
  """Panoptic-FPN semantic branch: every level brought to P2's stride and summed, then classified.

  P2 gets one conv stage, P3 one with one x2 upsampling, P4 two, P5 three. Returns logits at
  P2's resolution (stride 4).
  """

  num_classes: int
  channels: int = 128
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pyramid: Mapping[str, jax.Array]) -> jax.Array:
    summed = 0.0
    for level in LEVELS:
      x = pyramid[f"P{level}"]
      for stage in range(max(level - LEVELS[0], 1)):
        x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=resnet.CONV_INIT, dtype=self.dtype, name=f"level{level}_conv{stage}",
                    conv_general_dilated=layers.conv_general_dilated)(x)
        x = nn.GroupNorm(self.groups, dtype=self.dtype, name=f"level{level}_norm{stage}")(x)
        x = nn.relu(x)
        if level > LEVELS[0]:
          x = resize_to(x, pyramid[f"P{level - stage - 1}"].shape[1:3], "bilinear")
      summed = summed + x
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier",
                   conv_general_dilated=layers.conv_general_dilated)(summed)


class FPNSegmenter(nn.Module):
  """ResNet backbone + FPN + semantic head: images [B, H, W, 3] in [0, 1] -> float32 logits [B, H, W, K].

  The backbone is the submodule "backbone": load ImageNet weights into
  `variables["params"]["backbone"]` / `variables["batch_stats"]["backbone"]` with
  `resnet.load_pretrained`. With `return_features=True` it also returns the backbone's sample-metric
  features (resnet.metric_features), so a real-only FPN can serve as the metric encoder.
  """

  num_classes: int
  backbone_stages: Sequence[int] = resnet.RESNET50_STAGES
  dtype: Any = jnp.float32
  base_width: int = resnet.RESNET50_WIDTH  # scales the backbone, FPN (4x) and head (2x) widths

  @nn.compact
  def __call__(self, images: jax.Array, train: bool, return_features: bool = False):
    features = resnet.ResNet(self.backbone_stages, self.dtype, self.base_width, name="backbone")(images, train)
    pyramid = FPN(channels=4 * self.base_width, dtype=self.dtype, name="fpn")(features)
    head = 2 * self.base_width
    logits = SemanticHead(self.num_classes, channels=head, groups=min(32, head // 4), dtype=self.dtype,
                          name="head")(pyramid)
    # Upsample in float32: the loss and argmax see the logits at full precision.
    logits = resize_to(logits.astype(jnp.float32), images.shape[1:3], "bilinear")
    return (logits, resnet.metric_features(features)) if return_features else logits
