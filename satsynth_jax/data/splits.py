"""A prepared workdir's splits: the roles a download's scenes take, and what identifies each prepared split.

train is what G and the segmenters learn from, val where settings are chosen, test where claims
are made (assign_splits gives a download's scenes these roles). Each split's manifest records the
settings that shaped it (split_settings); check_settings refuses a split prepared under other
settings, and data_identity is what every model and set made from the train split records
(infra/identity.py), so nothing is reused on data prepared again. The prepare job
(jobs/prepare.py) writes the splits; every later job reads them through these functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import ml_collections
import numpy as np

from satsynth_jax.data import records
from satsynth_jax.data.sources.scenes import Scene
from satsynth_jax.infra import workdir as layout
from satsynth_jax.infra.errors import ConfigError, SatSynthError

SOURCE_KEY = "data.source_dir"


class PrepareError(SatSynthError, ValueError):
  """A split that would be empty, or one already prepared with other settings than the config's."""


def require_source(data: ml_collections.ConfigDict) -> None:
  """A download's folder: prepare reads it; every later job reads the prepared records (and their settings)."""
  if data.format != "demo" and not data.source_dir:
    raise ConfigError(f"config.data.source_dir={data.source_dir!r}: is empty: preparing the workdir's data reads "
                      f"the {data.format} download from it (--config.data.source_dir=/path/to/it)")


def split_settings(config: ml_collections.ConfigDict) -> dict:
  """The config values that shape a split, by config key, as JSON stores them; its manifest records them.

  The demo's scenes depend on its scene settings and seed instead of a source folder; a
  download's split roles on the hold-out fractions and their seed. The download's folder
  counts by its real path (source_path): however it is spelled, a rerun and every model's
  identity (data_identity) see one folder. Jobs after prepare need no folder: without one,
  the key is left out and check_settings takes the split's own.
  """
  data = config.data
  values = {"data.format": data.format}
  if data.format == "demo":
    values |= {"data.demo_num_scenes": data.demo_num_scenes, "data.demo_scene_size": data.demo_scene_size,
               "data.demo_seed": data.demo_seed}
  else:
    values |= {"data.val_fraction": data.val_fraction, "data.test_fraction": data.test_fraction,
               "data.split_seed": data.split_seed}
    if data.source_dir:
      values[SOURCE_KEY] = str(source_path(data))
  values |= {"data.patch_size": data.patch_size, "data.patch_stride": data.patch_stride or data.patch_size,
             "data.num_classes": data.num_classes, "data.class_names": list(data.class_names),
             "data.mask_format": data.mask_format, "data.label_offset": data.label_offset,
             "data.ignore_raw_values": list(data.ignore_raw_values),
             "data.max_no_data_fraction": data.max_no_data_fraction}
  if data.mask_format == "rgb":
    values["data.palette"] = [list(colour) for colour in data.palette]
  return json.loads(json.dumps(values))  # tuples become lists, as in the manifest


def source_path(data: ml_collections.ConfigDict) -> pathlib.Path:
  """The download's folder by its real path: a symlink or `..` to the same folder is the same source."""
  return pathlib.Path(data.source_dir).expanduser().resolve()


# Manifests written before `settings` existed: the settings their own keys still tell.
_LEGACY_KEYS = {"data.format": "source", "data.patch_size": "patch_size", "data.patch_stride": "patch_stride",
                "data.num_classes": "num_classes", "data.class_names": "class_names"}


def recorded_settings(manifest: dict) -> dict:
  """The settings a split's manifest records (for a manifest from before `settings`, those its keys tell)."""
  if manifest.get("settings") is not None:
    return manifest["settings"]
  return {key: manifest[name] for key, name in _LEGACY_KEYS.items() if name in manifest}


def check_settings(split: str, manifest: dict, config: ml_collections.ConfigDict, workdir) -> None:
  """Refuse a prepared split whose recorded settings differ from the config's, naming each key (a
  config naming no download folder takes the split's: the prepared records are what later jobs read)."""
  old = recorded_settings(manifest)
  new = split_settings(config)
  if manifest.get("settings") is None:
    new = {key: value for key, value in new.items() if key in old}
  if _same_source(old, config.data):
    new[SOURCE_KEY] = old[SOURCE_KEY]
  absent = "(not recorded)"
  changed = [f"{key} {json.dumps(old.get(key, absent))} -> {json.dumps(new.get(key, absent))}"
             for key in sorted(old.keys() | new.keys()) if old.get(key, absent) != new.get(key, absent)]
  if changed:
    directory = layout.data_dir(workdir, split)
    raise PrepareError(
        f"{directory / records.MANIFEST} was prepared with other settings: {'; '.join(changed)}; "
        f"use a fresh --workdir, or delete {directory.parent} to prepare again")


def _same_source(old: dict, data: ml_collections.ConfigDict) -> bool:
  """Whether the config names no download folder, or the one a split was prepared from (by real path,
  so also as a manifest from before paths were resolved spelled it)."""
  if SOURCE_KEY not in old or data.format == "demo":
    return False
  return not data.source_dir or pathlib.Path(old[SOURCE_KEY]).resolve() == source_path(data)


def data_identity(workdir, split: str = "train") -> dict:
  """What a model or set made from a prepared split was made from, as shaping keys (identity.py):
  "<split>_split.<key>" for each setting its manifest records, and "<split>_split.digest", a sha256 of
  its pair count, class pixel counts and scenes (the same data whatever its shard layout). A run
  resumed, or a set reused, on data prepared again under other settings or from other files is refused."""
  manifest = records.read_manifest(layout.data_dir(workdir, split))
  content = {key: manifest.get(key) for key in ("num_examples", "class_pixels", "scenes")}
  digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
  prefix = _prefix(split)
  return {**{prefix + key: value for key, value in recorded_settings(manifest).items()}, prefix + "digest": digest}


def made_from(shaping: dict, split: str = "train") -> dict:
  """The data_identity keys of a recorded shaping: what that run or set was made from."""
  return {key: value for key, value in shaping.items() if key.startswith(_prefix(split))}


def _prefix(split: str) -> str:
  return f"{split}_split."


def _hold_out(scenes: list[Scene], role: str, fraction: float, seed: int) -> tuple[list[Scene], str]:
  """Move a seeded `fraction` of the train scenes (whole scenes, at least one, never all) to `role`."""
  train = sorted((s for s in scenes if s.split == "train"), key=lambda s: s.scene_id)
  count = min(max(round(fraction * len(train)), 1), len(train) - 1) if fraction > 0 and len(train) >= 2 else 0
  order = np.random.default_rng([seed, layout.SPLITS.index(role)]).permutation(len(train))
  chosen = {train[i].scene_id for i in order[:count]}
  moved = [dataclasses.replace(s, split=role) if s.scene_id in chosen else s for s in scenes]
  return moved, f"{role}: {count} of {len(train)} train scenes held out (data.{role}_fraction={fraction}, " \
                f"data.split_seed={seed})"


def assign_splits(scenes: list[Scene], data: ml_collections.ConfigDict) -> tuple[list[Scene], list[str]]:
  """Give the download's scenes their roles; returns the scenes and a note per role not taken as found.

  test (claims are made there, nothing is chosen there): the download's labelled test split;
  else its val split (LoveDA, iSAID and OpenEarthMap withhold their test labels, so the
  official val is the usual reporting split); else data.test_fraction of the train scenes.
  val (settings are chosen there): the download's val split when it also had a test split;
  else data.val_fraction of the remaining train scenes. Whole scenes, so no held-out patch
  shares pixels or context with a train patch. The demo draws all three splits itself.
  """
  notes = []
  found = {s.split for s in scenes}
  if "test" not in found and "val" in found:
    scenes = [dataclasses.replace(s, split="test") if s.split == "val" else s for s in scenes]
    notes.append("test: the download's val split (its test labels are not public); nothing is chosen on it")
  elif "test" not in found:
    scenes, note = _hold_out(scenes, "test", data.test_fraction, data.split_seed)
    notes.append(note)
  if "val" not in {s.split for s in scenes}:
    scenes, note = _hold_out(scenes, "val", data.val_fraction, data.split_seed)
    notes.append(note)
  return scenes, notes

