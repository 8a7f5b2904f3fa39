"""LoveDA: `<src>/{Train,Val}/{Urban,Rural}/{images_png,masks_png}/<id>.png`, index masks.

Raw labels 1..7 and 0 (no-data) are mapped by config.data.label_offset / ignore_raw_values
(configs/loveda.py). Tile ids are unique across domains in the release; scene ids still
carry the domain (`rural_18`) so a patch id says where it came from.
"""

from __future__ import annotations

import pathlib

import ml_collections

from satsynth_jax.data.sources.scenes import Inventory, Scene, describe_names, pair_by_stem, require_dir

SPLIT_DIRS = (("train", "Train"), ("val", "Val"))
DOMAINS = ("Urban", "Rural")
LAYOUT = "{Train,Val}/{Urban,Rural}/{images_png,masks_png}/<id>.png"


def find_scenes(source_dir: pathlib.Path, data: ml_collections.ConfigDict) -> Inventory:
  del data  # the label mapping lives in the config; the layout is fixed
  source_dir = require_dir(source_dir, LAYOUT)
  scenes, missing = [], []
  for split, split_dir in SPLIT_DIRS:
    for domain in DOMAINS:
      folder = source_dir / split_dir / domain
      if not (folder / "images_png").is_dir():
        missing.append(f"LoveDA {split_dir}/{domain}")
        continue
      pairs, lone_images, lone_masks = pair_by_stem(sorted((folder / "images_png").glob("*.png")),
                                                    sorted((folder / "masks_png").glob("*.png")))
      if lone_images:
        missing.append(f"LoveDA {split_dir}/{domain}: {len(lone_images)} image(s) without a mask "
                       f"({describe_names(lone_images)})")
      if lone_masks:
        missing.append(f"LoveDA {split_dir}/{domain}: {len(lone_masks)} mask(s) without an image "
                       f"({describe_names(lone_masks)})")
      scenes += [Scene(split, f"{domain.lower()}_{image.stem}", image, mask, "index") for image, mask in pairs]
  return Inventory(tuple(scenes), tuple(missing))
