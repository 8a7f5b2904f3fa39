"""Any dataset as plain folders: `<src>/images/*` + `<src>/masks/*` (one split, val and test held
out by prepare) or `<src>/{train,val[,test]}/{images,masks}/`. Images and masks pair by file stem.

Masks are index images (config.data.mask_format="index", mapped with label_offset /
ignore_raw_values) or colour-coded with config.data.palette ("rgb").
"""

from __future__ import annotations

import pathlib

import ml_collections

from satsynth_jax.data.sources.scenes import (SPLITS, TEST, Inventory, Scene, SourceError, describe_names,
                                              pair_by_stem, require_dir)

SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LAYOUT = "images/ + masks/, or {train,val[,test]}/{images,masks}/"


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.glob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def _split_scenes(split: str, root: pathlib.Path, mask_format: str, missing: list[str]) -> list[Scene]:
  pairs, lone_images, lone_masks = pair_by_stem(_files(root / "images"), _files(root / "masks"))
  if lone_images:
    missing.append(f"{root}: {len(lone_images)} image(s) without a mask ({describe_names(lone_images)})")
  if lone_masks:
    missing.append(f"{root}: {len(lone_masks)} mask(s) without an image ({describe_names(lone_masks)})")
  return [Scene(split, image.stem, image, mask, mask_format) for image, mask in pairs]


def find_scenes(source_dir: pathlib.Path, data: ml_collections.ConfigDict) -> Inventory:
  source_dir = require_dir(source_dir, LAYOUT)
  missing: list[str] = []
  if (source_dir / "images").is_dir():
    scenes = _split_scenes("train", source_dir, data.mask_format, missing)
    return Inventory(tuple(scenes), tuple(missing))
  split_roots = {split: source_dir / split for split in SPLITS + (TEST,) if (source_dir / split / "images").is_dir()}
  if not split_roots:
    raise SourceError(f"config.data.source_dir={str(source_dir)!r} has neither images/ nor "
                      f"train/images/ or val/images/; expected {LAYOUT}")
  scenes = []
  for split in SPLITS + (TEST,):
    if split in split_roots:
      scenes += _split_scenes(split, split_roots[split], data.mask_format, missing)
    elif split != TEST:  # a test split is optional: prepare holds one out (or uses val) without it
      missing.append(f"{split}/images/ (no {split} split)")
  return Inventory(tuple(scenes), tuple(missing))
