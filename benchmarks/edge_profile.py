"""Edge artifacts of synthetic images: the brightness step between consecutive rings from the border.

Run from the repository root on record folders (a real split first, then synthetic sets):

  python -m benchmarks.edge_profile runs/demo/data/train runs/demo/synthetic/diffusion_x0_presence

Ring k holds the pixels k steps from the nearest edge. For each image the mean grey level of every ring
is taken; the table gives, per pair of neighbouring rings, the mean over images of the absolute
difference. Real scenes have no edge structure, so their steps are flat; a generator that draws a
frame (e.g. from zero padding: models/unet.py EDGE_PADDINGS) shows a peak at the frame's ring. Every
image is resized to --size first, so sets of another size compare.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from benchmarks import common
from satsynth_jax.data import records


def ring_index(size: int) -> np.ndarray:
  """[size, size] distance of each pixel to the nearest edge (0 on the border)."""
  edge = np.minimum(np.arange(size), size - 1 - np.arange(size))
  return np.minimum.outer(edge, edge)


def ring_steps(images: np.ndarray, rings: int) -> np.ndarray:
  """Mean over images [N, S, S] (grey) of |mean(ring k) - mean(ring k + 1)|, for k < rings."""
  index = ring_index(images.shape[1])
  means = np.stack([images[:, index == k].mean(axis=1) for k in range(rings + 1)], axis=1)
  return np.abs(np.diff(means, axis=1)).mean(axis=0)


def grey_images(record_dir: str, size: int, limit: int) -> np.ndarray:
  """Up to `limit` images of a record folder as float grey levels [N, size, size]."""
  source = records.PairSource(record_dir)
  try:
    out = []
    for i in range(min(len(source), limit)):
      image = source[i]["image"]
      if image.shape[0] != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
      out.append(image.astype(np.float64).mean(axis=-1))
  finally:
    source.close()
  return np.stack(out)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("record_dirs", nargs="+")
  parser.add_argument("--size", type=int, default=32, help="images are resized to this side first")
  parser.add_argument("--rings", type=int, default=6, help="ring steps shown, from the border inwards")
  parser.add_argument("--limit", type=int, default=512, help="images read per folder")
  args = parser.parse_args(argv)
  header = ["record folder", "images"] + [f"ring {k}-{k + 1}" for k in range(args.rings)]
  rows = []
  for directory in args.record_dirs:
    images = grey_images(directory, args.size, args.limit)
    rows.append([os.path.normpath(directory), len(images)] + [f"{v:.2f}" for v in ring_steps(images, args.rings)])
  text = common.markdown_table(header, rows)
  print(text)
  return text


if __name__ == "__main__":
  main()
