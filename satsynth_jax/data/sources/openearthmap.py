"""OpenEarthMap: `<src>/<region>/{images,labels}/<name>.tif` with split lists `<src>/{train,val}.txt`.

GeoTIFFs are read with tifffile (pixels only; georeferencing is not needed for patches).
Raw label 0 ("unknown") and 1..8 are mapped by config.data.ignore_raw_values /
label_offset (configs/openearthmap.py). The split lists name files of every region, so
files are found by name wherever their region folder is; listed files that are absent
(e.g. the xBD regions the `_wo_xBD` release leaves out) are reported, not fatal.
"""

from __future__ import annotations

import pathlib

import ml_collections

from satsynth_jax.data.sources.scenes import SPLITS, Inventory, Scene, SourceError, describe_names, require_dir

LAYOUT = "<region>/images/<name>.tif, <region>/labels/<name>.tif and train.txt / val.txt"


def _read_list(path: pathlib.Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _index(source_dir: pathlib.Path, kind: str) -> dict[str, pathlib.Path]:
  found = {}
  for path in sorted(source_dir.glob(f"*/{kind}/*.tif")):
    if path.name in found:
      raise SourceError(f"{path}: file name also used by {found[path.name]}; split lists need unique names")
    found[path.name] = path
  return found


def find_scenes(source_dir: pathlib.Path, data: ml_collections.ConfigDict) -> Inventory:
  del data
  source_dir = require_dir(source_dir, LAYOUT)
  images, labels = _index(source_dir, "images"), _index(source_dir, "labels")
  scenes, missing = [], []
  for split in SPLITS:
    split_list = source_dir / f"{split}.txt"
    if not split_list.is_file():
      missing.append(f"OpenEarthMap {split}.txt (no {split} split)")
      continue
    absent = []
    for name in _read_list(split_list):
      name = pathlib.Path(name).name
      if name in images and name in labels:
        scenes.append(Scene(split, pathlib.Path(name).stem, images[name], labels[name], "index"))
      else:
        absent.append(name)
    if absent:
      missing.append(f"OpenEarthMap {split}: {len(absent)} listed file(s) without both image and label "
                     f"({describe_names(absent)})")
  return Inventory(tuple(scenes), tuple(missing))
