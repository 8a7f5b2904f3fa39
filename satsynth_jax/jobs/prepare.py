"""`--mode=prepare`: a dataset download -> `<workdir>/data/{train,val,test}/` record shards + previews.

Steps: list the download's scenes (config.data.format picks the converter; the demo draws
its scenes first), give them their roles (data/splits.py: train, val where settings are
chosen, test where claims are made), read and check each scene, cut it into patches
(tiling.py) and stream them into records. Patches that are entirely no-data are
kept, so patch counts match the paper's (16 per 1024 px LoveDA tile).

Nothing empty or stale passes as prepared: a split that would hold no patch (the patch
size exceeds every scene) is refused before anything is written, and each manifest records
the settings that shaped its split (`settings`, data/splits.py). Re-running is idempotent: a split whose
manifest.json exists is skipped if its settings equal the config's and refused, naming
each difference, if not; one without a manifest (an interrupted write) is rebuilt. The
download (data.source_dir) is read only while a split is left to write: every later job
reads the records and the settings their manifests record.
Previews and the class-frequency chart go to `<workdir>/report/`, and a summary (scenes,
patches, class shares, what the download lacked) is printed.
"""

from __future__ import annotations

import importlib
import pathlib

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from satsynth_jax.data import records, splits, tiling
from satsynth_jax.data.sources import demo, scenes as scene_io
from satsynth_jax.data.sources.scenes import Inventory, Scene
from satsynth_jax.infra import viz, workdir as layout

PREVIEW_PATCHES = 16
PREVIEW_TILE = 160  # px per preview tile (patches are scaled to it): 16 pairs in a ~1.3k px wide PNG


def is_complete(config: ml_collections.ConfigDict, workdir) -> bool:
  """Whether every split holds a manifest that verifies; a split prepared with other settings than the
  config's is refused (PrepareError, naming each key), as --mode=prepare refuses it."""
  done = True
  for split in layout.SPLITS:
    try:
      manifest = records.read_manifest(layout.data_dir(workdir, split))
    except records.RecordError:
      done = False
      continue
    splits.check_settings(split, manifest, config, workdir)
  return done


def check_not_empty(split: str, scenes: list[Scene], data: ml_collections.ConfigDict, stride: int) -> None:
  """Refuse, before anything is written, a split whose scenes (sizes from headers) give no patch."""
  sizes = {scene.scene_id: scene_io.scene_size(scene, data) for scene in scenes}
  if any(tiling.patch_starts(h, data.patch_size, stride) and tiling.patch_starts(w, data.patch_size, stride)
         for h, w in sizes.values()):
    return
  scene_id, (height, width) = max(sizes.items(), key=lambda item: (min(item[1]), item[1][0] * item[1][1]))
  raise splits.PrepareError(
      f"the {split} split would hold no patch: data.patch_size={data.patch_size} fits in none of its "
      f"{len(scenes)} scene(s) (the largest, {scene_id}, is {width}x{height} px); "
      f"set data.patch_size to at most {min(height, width)}")


def find_inventory(config: ml_collections.ConfigDict, workdir) -> tuple[Inventory, pathlib.Path]:
  """The scenes of config.data.format's download and its folder (the demo draws its scenes first)."""
  data = config.data
  if data.format == "demo":
    source_dir = demo.write_source(config, layout.demo_source_dir(workdir))
    converter = "folder"
  else:
    splits.require_source(data)  # only now: every split already prepared needs no download
    source_dir, converter = pathlib.Path(data.source_dir).expanduser(), data.format
  module = importlib.import_module(f"satsynth_jax.data.sources.{converter}")
  return module.find_scenes(source_dir, data), source_dir


def _pairs(scenes: list[Scene], data: ml_collections.ConfigDict, stride: int, split: str):
  """Patches of every scene as record pairs, with a progress bar over scenes.

  Train patches with more than data.max_no_data_fraction of no-data pixels (LoveDA's black
  borders) are dropped: they teach G little but the no-data code. Val keeps every patch, so
  scores stay comparable with the paper's protocol (no-data pixels are ignored there anyway).
  """
  bar = tqdm(scenes, desc=f"prepare {split}", unit="scene")
  patches = dropped = 0
  no_data = records.ignore_value(data.num_classes)
  for scene in bar:
    image, mask = scene_io.load_scene(scene, data)
    before = patches
    for y, x, image_patch, mask_patch in tiling.tile(image, mask, data.patch_size, stride):
      if split == "train" and np.mean(mask_patch == no_data) > data.max_no_data_fraction:
        dropped += 1
        continue
      patches += 1
      yield records.Pair(image=np.ascontiguousarray(image_patch), mask=np.ascontiguousarray(mask_patch),
                         id=tiling.patch_id(scene.scene_id, y, x), source=data.format,
                         num_classes=data.num_classes)
    if patches == before:
      logging.warning("%s: no patches (%dx%d px, data.patch_size=%d; %d dropped as mostly no-data so far)",
                      scene.image_path, image.shape[1], image.shape[0], data.patch_size, dropped)
    bar.set_postfix(patches=patches, dropped=dropped)
  if dropped:
    logging.warning("prepare %s: dropped %d patches with more than data.max_no_data_fraction=%g no-data", split,
                    dropped, data.max_no_data_fraction)


def write_split(directory: pathlib.Path, scenes: list[Scene], data: ml_collections.ConfigDict, *,
                source_dir: pathlib.Path, missing: tuple[str, ...], split_notes: list[str],
                settings: dict) -> dict:
  """Stream the scenes' patches into `directory`; the manifest records how they were made."""
  stride = data.patch_stride or data.patch_size
  split = directory.name
  if split == "train" and data.max_no_data_fraction < 1:
    hint = f" (or every patch has more than data.max_no_data_fraction={data.max_no_data_fraction:g} no-data)"
  else:
    hint = ""
  try:
    return _write(directory, scenes, data, stride, split, source_dir, missing, split_notes, settings)
  except records.RecordError as e:
    if "no examples to write" not in str(e):
      raise
    raise splits.PrepareError(f"{split} split: no patches to write{hint}; nothing was saved") from e


def _write(directory, scenes, data, stride, split, source_dir, missing, split_notes, settings) -> dict:
  return records.write_records(
      directory, _pairs(scenes, data, stride, split), num_classes=data.num_classes,
      class_names=list(data.class_names), source=data.format, examples_per_shard=data.examples_per_shard,
      overwrite=True,  # no manifest here: leftovers of an interrupted write, safe to replace
      patch_size=data.patch_size, patch_stride=stride, num_scenes=len(scenes),
      scenes=[s.scene_id for s in scenes], source_dir=str(source_dir), missing=list(missing),
      split_notes=split_notes, settings=settings)


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


def write_previews(directory: pathlib.Path, workdir, data: ml_collections.ConfigDict) -> list[pathlib.Path]:
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
  return [viz.save_png(grid, layout.report_path(workdir, f"prepare_{split}.png")),
          viz.save_png(chart, layout.report_path(workdir, f"class_frequency_{split}.png"))]


def summary(manifests: dict[str, dict | None], written: set[str], data: ml_collections.ConfigDict) -> str:
  """The lines prepare prints: per split scenes, patches, shards, class shares; then the notes."""
  lines = [f"prepare: {data.format} (K={data.num_classes}, {data.patch_size} px patches)"]
  notes: list[str] = []
  for split in layout.SPLITS:
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
    notes += [n for n in [manifest.get("val_holdout"), *manifest.get("split_notes", []), *manifest.get("missing", [])]
              if n and n not in notes]
  if notes:
    lines += ["  notes (split roles, what the download lacked):"] + [f"    - {n}" for n in notes]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, dict | None]:
  """Prepare both splits (skipping finished ones); returns each split's manifest (None if empty)."""
  data = config.data
  directories = {split: layout.data_dir(workdir, split) for split in layout.SPLITS}
  done = {s for s in layout.SPLITS if (directories[s] / records.MANIFEST).is_file()}
  for split in [s for s in layout.SPLITS if s in done]:
    splits.check_settings(split, records.read_manifest(directories[split]), config, workdir)
    logging.info("%s already holds a manifest: skipping the %s split", directories[split], split)
  written: set[str] = set()
  if done != set(layout.SPLITS):
    inventory, source_dir = find_inventory(config, workdir)
    for note in inventory.missing:
      logging.warning("not in the download: %s", note)
    scenes, split_notes = splits.assign_splits(list(inventory.scenes), data)
    for note in split_notes:
      logging.info("%s", note)
    by_split = {s: [scene for scene in scenes if scene.split == s] for s in layout.SPLITS}
    if not by_split["train"]:
      raise scene_io.SourceError(f"no train scenes found for data.format={data.format!r} under "
                                 f"{source_dir}; missing: {list(inventory.missing)}")
    for split in layout.SPLITS[1:]:
      if not by_split[split]:
        raise splits.PrepareError(
            f"the {split} split would hold no scene: {len(by_split['train']) + len(by_split[split])} train scene(s) "
            f"leave none to hold out (data.{split}_fraction={data[split + '_fraction']}); a download needs at least "
            "3 scenes, or val/ and test/ folders of its own")
    todo = [split for split in layout.SPLITS if split not in done and by_split[split]]
    for split in todo:  # all checked before the first write
      check_not_empty(split, by_split[split], data, data.patch_stride or data.patch_size)
    for split in todo:
      write_split(directories[split], by_split[split], data, source_dir=source_dir, missing=inventory.missing,
                  split_notes=split_notes, settings=splits.split_settings(config))
      written.add(split)
  manifests = {}
  for split in layout.SPLITS:
    manifests[split] = records.read_manifest(directories[split]) if split in done | written else None
    if manifests[split] is not None:
      for path in write_previews(directories[split], workdir, data):
        logging.info("wrote %s", path)
  print(summary(manifests, written, data), flush=True)
  return manifests
