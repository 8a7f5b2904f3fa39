"""`--mode=prepare`: a dataset download -> `<workdir>/data/{train,val}/` record shards + previews.

Steps: list the download's scenes (config.data.format picks the converter; the demo draws
its scenes first), assign splits (holding out data.val_fraction of the train scenes, by
scene, when the download has no val split), read and check each scene, cut it into
patches (tiling.py) and stream them into records. Patches that are entirely no-data are
kept, so patch counts match the paper's (16 per 1024 px LoveDA tile).

Re-running is idempotent: a split whose manifest.json exists is skipped; one without (an
interrupted write) is rebuilt. Previews and the class-frequency chart go to
`<workdir>/report/`, and a summary (scenes, patches, class shares, what the download
lacked) is printed.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from satsynth_jax import viz
from satsynth_jax.data import records, sources, tiling
from satsynth_jax.data.sources import SPLITS, Inventory, Scene
from satsynth_jax.data.sources import demo

PREVIEW_PATCHES = 16
PREVIEW_TILE = 160  # px per preview tile (patches are scaled to it): 16 pairs in a ~1.3k px wide PNG


def split_dir(workdir: pathlib.Path, split: str) -> pathlib.Path:
  return pathlib.Path(workdir) / "data" / split


def find_inventory(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[Inventory, pathlib.Path]:
  """The scenes of config.data.format's download and its folder (the demo draws its scenes first)."""
  data = config.data
  if data.format == "demo":
    source_dir = demo.write_source(config, pathlib.Path(workdir) / "demo_source")
    converter = "folder"
  else:
    source_dir, converter = pathlib.Path(data.source_dir), data.format
  module = importlib.import_module(f"satsynth_jax.data.sources.{converter}")
  return module.find_scenes(source_dir, data), source_dir


def hold_out_val(scenes: list[Scene], val_fraction: float, seed: int) -> tuple[list[Scene], str | None]:
  """With no val scene, move a seeded val_fraction of the train scenes (whole scenes) to val.

  Whole scenes, so no val patch shares pixels or context with a train patch. Returns the
  scenes and a note for the summary (None when the download had its own val split).
  """
  if any(s.split == "val" for s in scenes):
    return scenes, None
  train = sorted(scenes, key=lambda s: s.scene_id)
  count = round(val_fraction * len(train))
  if val_fraction > 0 and len(train) >= 2:
    count = min(max(count, 1), len(train) - 1)
  else:
    count = 0
  chosen = {train[i].scene_id for i in np.random.default_rng(seed).permutation(len(train))[:count]}
  note = (f"no val split in the download: held out {count} of {len(train)} train scenes as val "
          f"(data.val_fraction={val_fraction}, seed={seed})")
  return [dataclasses.replace(s, split="val") if s.scene_id in chosen else s for s in train], note


def _pairs(scenes: list[Scene], data: ml_collections.ConfigDict, stride: int, split: str):
  """Patches of every scene as record pairs, with a progress bar over scenes."""
  bar = tqdm(scenes, desc=f"prepare {split}", unit="scene")
  patches = 0
  for scene in bar:
    image, mask = sources.load_scene(scene, data)
    before = patches
    for y, x, image_patch, mask_patch in tiling.tile(image, mask, data.patch_size, stride):
      patches += 1
      yield records.Pair(image=np.ascontiguousarray(image_patch), mask=np.ascontiguousarray(mask_patch),
                         id=tiling.patch_id(scene.scene_id, y, x), source=data.format,
                         num_classes=data.num_classes)
    if patches == before:
      logging.warning("%s: %dx%d px is smaller than data.patch_size=%d; no patches", scene.image_path,
                      image.shape[1], image.shape[0], data.patch_size)
    bar.set_postfix(patches=patches)


def write_split(directory: pathlib.Path, scenes: list[Scene], data: ml_collections.ConfigDict, *,
                source_dir: pathlib.Path, missing: tuple[str, ...], val_note: str | None) -> dict:
  """Stream the scenes' patches into `directory`; the manifest records how they were made."""
  stride = data.patch_stride or data.patch_size
  split = directory.name
  return records.write_records(
      directory, _pairs(scenes, data, stride, split), num_classes=data.num_classes,
      class_names=list(data.class_names), source=data.format, examples_per_shard=data.examples_per_shard,
      overwrite=True,  # no manifest here: leftovers of an interrupted write, safe to replace
      patch_size=data.patch_size, patch_stride=stride, num_scenes=len(scenes),
      scenes=[s.scene_id for s in scenes], source_dir=str(source_dir), missing=list(missing),
      val_holdout=val_note)


def class_shares(manifest: dict) -> tuple[np.ndarray, float]:
  """(per-class fraction of labelled pixels, no-data fraction of all pixels) of a split."""
  pixels = np.asarray(manifest["class_pixels"], np.float64)
  total = manifest["num_examples"] * manifest["patch_size"] ** 2
  labelled = pixels.sum()
  return pixels / max(labelled, 1.0), (total - labelled) / max(total, 1)


def format_percent(fraction: float) -> str:
  """97.3%, 0.27%, 0.0041%: two or three significant digits, enough to tell rare classes apart."""
  percent = 100.0 * fraction
  if percent == 0:
    return "0%"
  return f"{percent:.3g}%" if percent >= 1 else f"{percent:.2g}%"


def _count(n: int, singular: str, plural: str | None = None) -> str:
  return f"{n} {singular if n == 1 else plural or singular + 's'}"


def write_previews(directory: pathlib.Path, report_dir: pathlib.Path,
                   data: ml_collections.ConfigDict) -> list[pathlib.Path]:
  """report/prepare_<split>.png (patches beside their masks) and class_frequency_<split>.png."""
  split = directory.name
  source = records.PairSource(directory)
  manifest = source.manifest
  try:
    count = min(PREVIEW_PATCHES, len(source))
    picks = sorted({int(i) for i in np.linspace(0, len(source) - 1, count).round()})  # spread over scenes
    examples = [source[i] for i in picks]
  finally:
    source.close()
  grid = viz.pair_grid(
      [e["image"] for e in examples], [e["mask"] for e in examples], data.palette,
      records.ignore_value(data.num_classes), columns=4, tile_size=PREVIEW_TILE,
      captions=[e["id"] for e in examples], class_names=data.class_names,
      title=f"{data.format} {split}: {len(examples)} of {manifest['num_examples']} patches "
            f"({data.patch_size} px) from {_count(manifest['num_scenes'], 'scene')}")
  shares, no_data = class_shares(manifest)
  excluded = f" (no-data: {format_percent(no_data)} of pixels, excluded)" if no_data else ""
  chart = viz.bar_chart(
      shares, data.class_names, f"{data.format} {split}: class share of labelled pixels{excluded}", log=True,
      colors=data.palette, value_label="fraction of labelled pixels", value_format=format_percent)
  return [viz.save_png(grid, report_dir / f"prepare_{split}.png"),
          viz.save_png(chart, report_dir / f"class_frequency_{split}.png")]


def summary(manifests: dict[str, dict | None], written: set[str], data: ml_collections.ConfigDict) -> str:
  """The lines prepare prints: per split scenes, patches, shards, class shares; then the notes."""
  lines = [f"prepare: {data.format} (K={data.num_classes}, {data.patch_size} px patches)"]
  notes: list[str] = []
  for split in SPLITS:
    manifest = manifests.get(split)
    if manifest is None:
      lines.append(f"  {split}: not written (no scenes)")
      continue
    status = "written" if split in written else "already prepared, skipped"
    lines.append(f"  {split}: {_count(manifest['num_scenes'], 'scene')} -> "
                 f"{_count(manifest['num_examples'], 'patch', 'patches')} in "
                 f"{_count(len(manifest['shards']), 'shard')} ({status})")
    shares, no_data = class_shares(manifest)
    classes = ", ".join(f"{name} {format_percent(s)}" for name, s in zip(data.class_names, shares))
    lines.append(f"    classes: {classes}; no-data {format_percent(no_data)} of all pixels")
    notes += [n for n in [manifest.get("val_holdout"), *manifest.get("missing", [])] if n and n not in notes]
  if notes:
    lines += ["  notes (what the download lacked):"] + [f"    - {n}" for n in notes]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, dict | None]:
  """Prepare both splits (skipping finished ones); returns each split's manifest (None if empty)."""
  workdir = pathlib.Path(workdir)
  data = config.data
  if data.ignore_index != records.ignore_value(data.num_classes):
    raise sources.SourceError(
        f"config.data.ignore_index={data.ignore_index}: records store no-data as "
        f"{records.ignore_value(data.num_classes)} for {data.num_classes} classes; set it to that")
  done = {s for s in SPLITS if (split_dir(workdir, s) / records.MANIFEST).is_file()}
  for split in sorted(done):
    logging.info("%s already holds a manifest: skipping the %s split", split_dir(workdir, split), split)
  written: set[str] = set()
  if done != set(SPLITS):
    inventory, source_dir = find_inventory(config, workdir)
    for note in inventory.missing:
      logging.warning("not in the download: %s", note)
    scenes, val_note = hold_out_val(list(inventory.scenes), data.val_fraction, config.seed)
    if val_note:
      logging.warning("%s", val_note)
    by_split = {s: [scene for scene in scenes if scene.split == s] for s in SPLITS}
    if not by_split["train"]:
      raise sources.SourceError(f"no train scenes found for data.format={data.format!r} under "
                                f"{source_dir}; missing: {list(inventory.missing)}")
    for split in SPLITS:
      if split in done or not by_split[split]:
        continue
      write_split(split_dir(workdir, split), by_split[split], data, source_dir=source_dir,
                  missing=inventory.missing, val_note=val_note)
      written.add(split)
  manifests = {}
  for split in SPLITS:
    directory = split_dir(workdir, split)
    manifests[split] = records.read_manifest(directory) if split in done | written else None
    if manifests[split] is not None:
      for path in write_previews(directory, workdir / "report", data):
        logging.info("wrote %s", path)
  print(summary(manifests, written, data), flush=True)
  return manifests
