"""iSAID: `<src>/{train,val}/images/<id>.png` beside its colour-coded `<id>_instance_color_RGB.png`.

The official release keeps the instance-id masks (`<id>_instance_id_RGB.png`) in the same
folder; they are skipped. Masks are decoded with config.data.palette (configs/isaid.py).
"""

from __future__ import annotations

import pathlib

import ml_collections

from satsynth_jax.data.sources.scenes import SPLITS, Inventory, Scene, describe_names, require_dir

MASK_SUFFIX = "_instance_color_RGB"
OTHER_SUFFIXES = (MASK_SUFFIX, "_instance_id_RGB")
LAYOUT = "{train,val}/images/<id>.png with <id>_instance_color_RGB.png beside each"


def find_scenes(source_dir: pathlib.Path, data: ml_collections.ConfigDict) -> Inventory:
  del data  # iSAID's layout and mask coding are fixed
  source_dir = require_dir(source_dir, LAYOUT)
  scenes, missing = [], []
  for split in SPLITS:
    folder = source_dir / split / "images"
    if not folder.is_dir():
      missing.append(f"iSAID {split}/images/ (no {split} split)")
      continue
    images = sorted(p for p in folder.glob("*.png") if not p.stem.endswith(OTHER_SUFFIXES))
    unlabelled = []
    for image in images:
      mask = image.with_name(image.stem + MASK_SUFFIX + ".png")
      if mask.is_file():
        scenes.append(Scene(split, image.stem, image, mask, "rgb"))
      else:
        unlabelled.append(image.name)
    if unlabelled:
      missing.append(f"iSAID {split}: {len(unlabelled)} image(s) without {MASK_SUFFIX}.png mask "
                     f"({describe_names(unlabelled)})")
  return Inventory(tuple(scenes), tuple(missing))
