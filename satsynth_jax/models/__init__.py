"""Pure Flax models: G's U-Net (unet.py) and the segmenters on a ResNet backbone (fpn.py, unet_seg.py)."""

from satsynth_jax.models.fpn import FPNSegmenter
from satsynth_jax.models.unet_seg import UNetSegmenter

SEGMENTERS = {"fpn": FPNSegmenter, "unet": UNetSegmenter}  # segmentation.architecture -> model
