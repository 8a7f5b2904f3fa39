"""Cut scenes into square patches for the record files.

Patches start every `stride` pixels (stride = patch_size: non-overlapping). Where a scene's
size is not a multiple of the stride, the last row/column of patches is aligned to the
scene's far edge instead of being dropped, as the iSAID devkit does: every pixel is kept
(rare small objects at scene borders matter) at the price of that one row/column
overlapping its neighbour. Sizes that divide evenly (LoveDA/OpenEarthMap 1024 px tiles,
256 px patches) give exactly the paper's non-overlapping grid. Scenes smaller than a patch
in either direction give no patches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def patch_starts(length: int, patch_size: int, stride: int) -> list[int]:
  """Offsets along one axis: 0, stride, 2*stride, ... plus length - patch_size to reach the edge."""
  if patch_size <= 0 or stride <= 0:
    raise ValueError(f"patch_size={patch_size} and stride={stride} must be positive")
  if length < patch_size:
    return []
  starts = list(range(0, length - patch_size + 1, stride))
  if starts[-1] + patch_size < length:
    starts.append(length - patch_size)
  return starts


def patch_id(scene_id: str, y: int, x: int) -> str:
  """`<scene>_y<top>_x<left>`, offsets in pixels of the source scene."""
  return f"{scene_id}_y{y}_x{x}"


def tile(image: np.ndarray, mask: np.ndarray, patch_size: int,
         stride: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
  """(top, left, image patch, mask patch) in row-major order; patches are views, not copies."""
  if image.shape[:2] != mask.shape[:2]:
    raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
  height, width = mask.shape[:2]
  for y in patch_starts(height, patch_size, stride):
    for x in patch_starts(width, patch_size, stride):
      yield y, x, image[y:y + patch_size, x:x + patch_size], mask[y:y + patch_size, x:x + patch_size]
