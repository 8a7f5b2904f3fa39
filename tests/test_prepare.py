"""--mode=prepare end to end: official layouts -> record shards whose pixels equal the source tiles."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import REPO, load_config
from satsynth_jax import config_check
from satsynth_jax.data import records, splits, tiling
from satsynth_jax.data.sources.scenes import SourceError
from satsynth_jax.infra.errors import ConfigError
from satsynth_jax.jobs import prepare
from test_sources import loveda_classes, save, write_isaid, write_loveda, write_openearthmap

ID = re.compile(r"(?P<scene>.+)_y(?P<y>\d+)_x(?P<x>\d+)")


def read_split(directory: pathlib.Path) -> list[dict]:
  source = records.PairSource(directory)
  try:
    return [source[i] for i in range(len(source))]
  finally:
    source.close()


def assert_records_match(directory: pathlib.Path, expected, patch: int) -> list[dict]:
  """Every record is the (image, mask) crop of its scene named by its id; returns the records."""
  pairs = read_split(directory)
  for pair in pairs:
    scene, y, x = ID.fullmatch(pair["id"]).group("scene", "y", "x")
    image, mask = expected[scene]
    y, x = int(y), int(x)
    np.testing.assert_array_equal(pair["image"], image[y:y + patch, x:x + patch], err_msg=pair["id"])
    np.testing.assert_array_equal(pair["mask"], mask[y:y + patch, x:x + patch], err_msg=pair["id"])
  return pairs


# No deadline: pure Python, but a loaded 2-core machine stalls single examples past 200 ms.
@settings(deadline=None)
@given(length=st.integers(1, 300), patch=st.integers(1, 64), stride=st.integers(1, 80))
def test_patch_starts_cover_the_axis_inside_bounds(length, patch, stride):
  starts = tiling.patch_starts(length, patch, stride)
  if length < patch:
    assert starts == []
    return
  assert starts[0] == 0 and starts[-1] == length - patch  # reaches both edges
  assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))  # increasing, no gap wider than stride
  assert all(s % stride == 0 for s in starts[:-1])  # the regular grid, only the last one edge-aligned


def test_tiles_exact_multiples_without_overlap_and_aligns_the_ragged_edge():
  assert tiling.patch_starts(1024, 256, 256) == [0, 256, 512, 768]  # LoveDA: 16 disjoint patches per tile
  assert tiling.patch_starts(1147, 256, 256) == [0, 256, 512, 768, 891]
  image, mask = np.zeros((20, 30, 3), np.uint8), np.arange(600).reshape(20, 30)
  tiles = list(tiling.tile(image, mask, 16, 16))
  assert [(y, x) for y, x, _, _ in tiles] == [(0, 0), (0, 14), (4, 0), (4, 14)]
  np.testing.assert_array_equal(tiles[3][3], mask[4:, 14:])


def test_isaid_layout_to_records(tmp_path, capsys):
  src = tmp_path / "isaid"
  expected = write_isaid(src, {"train": {"P0001": (40, 50), "P0002": (16, 16), "P0004": (16, 16)},
                               "val": {"P0003": (20, 17)}})
  config = load_config("isaid", **{"data.source_dir": str(src), "data.patch_size": 16,
                                   "data.examples_per_shard": 5, "data.val_fraction": 0.3})
  manifests = prepare.run(config, tmp_path / "work")
  train = assert_records_match(tmp_path / "work/data/train", expected, 16)
  ids = [pair["id"] for pair in train]
  # iSAID's test labels are not public: its val split is the test split, val is held out of train.
  held_out = manifests["val"]["scenes"]
  assert len(held_out) == 1 and held_out[0] in ("P0001", "P0002", "P0004")
  assert sorted(manifests["train"]["scenes"] + held_out) == ["P0001", "P0002", "P0004"]
  assert manifests["test"]["scenes"] == ["P0003"]
  p1 = [f"P0001_y{y}_x{x}" for y in (0, 16, 24) for x in (0, 16, 32, 34)]
  assert ids == [i for scene in manifests["train"]["scenes"] for i in (p1 if scene == "P0001" else [f"{scene}_y0_x0"])]
  assert {pair["source"] for pair in train} == {"isaid"} and train[0]["num_classes"] == 16
  manifest = manifests["train"]
  assert sum(shard["count"] for shard in manifest["shards"]) == len(train)
  assert all(shard["count"] <= 5 for shard in manifest["shards"])
  assert manifest["patch_size"] == 16 and manifest["patch_stride"] == 16
  notes = manifest["split_notes"]
  assert notes[0].startswith("test: the download's val split") and notes[1].startswith("val: 1 of 3 train scenes")
  counts = np.bincount(np.concatenate([p["mask"].ravel() for p in train]), minlength=16)
  assert manifest["class_pixels"] == counts.tolist()
  assert [p["id"] for p in assert_records_match(tmp_path / "work/data/test", expected, 16)] == [
      "P0003_y0_x0", "P0003_y0_x1", "P0003_y4_x0", "P0003_y4_x1"]
  assert_records_match(tmp_path / "work/data/val", expected, 16)
  for split in ("train", "val", "test"):
    for name in (f"prepare_{split}", f"class_frequency_{split}"):
      assert Image.open(tmp_path / f"work/report/{name}.png").size[0] > 300
  out = capsys.readouterr().out
  assert f"train: 2 scenes -> {len(train)} patches in {len(manifest['shards'])} shards (written)" in out
  assert "test: 1 scene -> 4 patches in 1 shard (written)" in out
  assert "test: the download's val split (its test labels are not public)" in out


def test_full_loveda_layout_reports_on_its_official_val_split(tmp_path):
  parts = {("Train", "Urban"): ["1400", "1401"], ("Train", "Rural"): ["7"], ("Val", "Urban"): ["2600"],
           ("Val", "Rural"): ["3900"]}
  expected = write_loveda(tmp_path / "loveda", parts)
  config = load_config("loveda", **{"data.source_dir": str(tmp_path / "loveda"), "data.patch_size": 16,
                                    "data.val_fraction": 0.3})
  manifests = prepare.run(config, tmp_path / "work")
  assert sorted(manifests["train"]["scenes"] + manifests["val"]["scenes"]) == ["rural_7", "urban_1400", "urban_1401"]
  assert len(manifests["val"]["scenes"]) == 1  # 0.3 x 3 train scenes, whole scenes
  assert manifests["test"]["scenes"] == ["urban_2600", "rural_3900"]  # LoveDA Val: the reporting split
  assert manifests["train"]["missing"] == []
  pairs = assert_records_match(tmp_path / "work/data/test", expected, 16)
  assert len(pairs) == 2 * 2 * 3  # 32 x 40 px tiles -> 2 x 3 patches each


def test_partial_loveda_converts_what_is_there_and_holds_out_val_and_test(tmp_path, capsys):
  ids = [str(i) for i in range(6)]
  expected = write_loveda(tmp_path / "loveda", {("Train", "Rural"): ids}, size=(16, 16))
  overrides = {"data.source_dir": str(tmp_path / "loveda"), "data.patch_size": 16, "data.val_fraction": 0.2,
               "data.test_fraction": 0.3}
  manifests = prepare.run(load_config("loveda", **overrides), tmp_path / "work")
  out = capsys.readouterr().out
  for part in ("Train/Urban", "Val/Urban", "Val/Rural"):
    assert f"LoveDA {part}" in out and f"LoveDA {part}" in manifests["train"]["missing"]
  assert "test: 2 of 6 train scenes held out" in out and "val: 1 of 4 train scenes held out" in out
  val, test = manifests["val"]["scenes"], manifests["test"]["scenes"]
  assert len(val) == 1 and len(test) == 2 and not set(val) & set(test)
  assert sorted(manifests["train"]["scenes"] + val + test) == sorted(expected)
  assert_records_match(tmp_path / "work/data/val", expected, 16)
  assert_records_match(tmp_path / "work/data/test", expected, 16)
  again = prepare.run(load_config("loveda", **overrides), tmp_path / "other")
  assert (again["val"]["scenes"], again["test"]["scenes"]) == (val, test)  # deterministic in data.split_seed
  other = prepare.run(load_config("loveda", **overrides, **{"data.split_seed": 5}), tmp_path / "third")
  assert (other["val"]["scenes"], other["test"]["scenes"]) != (val, test)


def test_openearthmap_layout_to_records(tmp_path):
  expected = write_openearthmap(tmp_path / "oem", {"train": ["aachen_1.tif", "kyoto_4.tif"], "val": ["kyoto_9.tif"]})
  config = load_config("openearthmap", **{"data.source_dir": str(tmp_path / "oem"), "data.patch_size": 16})
  manifests = prepare.run(config, tmp_path / "work")
  assert manifests["train"]["num_examples"] == 4 and manifests["val"]["num_examples"] == 4  # one train tile held out
  assert manifests["test"]["num_examples"] == 4 and manifests["test"]["scenes"] == ["kyoto_9"]
  pairs = assert_records_match(tmp_path / "work/data/train", expected, 16)
  assert 255 in np.concatenate([p["mask"].ravel() for p in pairs])  # raw 0 "unknown" is no-data
  assert sum(manifests["train"]["class_pixels"]) == np.count_nonzero(
      np.concatenate([p["mask"].ravel() for p in pairs]) != 255)


def test_folder_rgb_masks_with_flat_layout(tmp_path):
  palette = ((0, 0, 0), (255, 255, 255), (0, 128, 255))
  rng = np.random.default_rng(3)
  expected = {}
  for stem in ("s1", "s2", "s3"):
    image, classes = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), rng.integers(0, 3, (24, 24)).astype(np.uint8)
    save(tmp_path / "src/images" / f"{stem}.png", image)
    save(tmp_path / "src/masks" / f"{stem}.png", np.asarray(palette, np.uint8)[classes])
    expected[stem] = image, classes
  config = load_config("default", **{"data.source_dir": str(tmp_path / "src"), "data.mask_format": "rgb",
                                     "data.num_classes": 3, "data.class_names": ("a", "b", "c"),
                                     "data.palette": palette, "data.patch_size": 12, "data.val_fraction": 0.3,
                                     "data.test_fraction": 0.3})
  manifests = prepare.run(config, tmp_path / "work")
  assert [manifests[split]["num_scenes"] for split in ("train", "val", "test")] == [1, 1, 1]
  for split in ("train", "val", "test"):
    assert_records_match(tmp_path / f"work/data/{split}", expected, 12)


def test_rerun_skips_finished_splits_and_rebuilds_an_interrupted_one(tmp_path, capsys):
  write_isaid(tmp_path / "src", {"train": {"P1": (16, 32), "P3": (16, 16)}, "val": {"P2": (16, 16)}})
  config = load_config("isaid", **{"data.source_dir": str(tmp_path / "src"), "data.patch_size": 16})
  work = tmp_path / "work"
  first = prepare.run(config, work)
  shard = work / "data/train" / records.shard_filename(0)
  before = shard.stat().st_mtime_ns
  (work / "data/test" / records.MANIFEST).unlink()  # as if the test write had been interrupted
  capsys.readouterr()
  manifests = prepare.run(config, work)
  out = capsys.readouterr().out
  assert shard.stat().st_mtime_ns == before
  train = first["train"]
  assert f"train: 1 scene -> {train['num_examples']} patch" in out and "(already prepared, skipped)" in out
  assert "test: 1 scene -> 1 patch in 1 shard (written)" in out
  assert manifests["test"]["num_examples"] == 1 and len(read_split(work / "data/test")) == 1


def test_patch_larger_than_every_scene_is_refused_before_anything_is_written(tmp_path):
  write_isaid(tmp_path / "src", {"train": {"P1": (40, 50), "P2": (30, 60), "P4": (40, 40)}, "val": {"P3": (20, 17)}})
  work = tmp_path / "work"

  def config(patch_size: int):
    return load_config("isaid", **{"data.source_dir": str(tmp_path / "src"), "data.patch_size": patch_size,
                                   "data.val_fraction": 0.3})

  with pytest.raises(splits.PrepareError, match=r"^the (train|val) split would hold no patch: data\.patch_size=64 "
                     r"fits in none of its \d scene\(s\) .*; .*at most 40$"):
    prepare.run(config(64), work)
  # Train would get patches but test (iSAID's val) would not: still refused before train is written.
  with pytest.raises(splits.PrepareError, match=r"the test split would hold no patch: .*P3, is 17x20 px"):
    prepare.run(config(32), work)
  assert not (work / "data").exists() and not (work / "report").exists()
  manifests = prepare.run(config(16), work)
  assert manifests["train"]["num_examples"] > 0 and manifests["test"]["num_examples"] == 4


def test_rerun_with_other_settings_is_refused_naming_each_key(tmp_path, capsys):
  write_isaid(tmp_path / "src", {"train": {"P1": (32, 32), "P3": (32, 32)}, "val": {"P2": (32, 32)}})
  overrides = {"data.source_dir": str(tmp_path / "src"), "data.patch_size": 16}
  work = tmp_path / "work"
  manifests = prepare.run(load_config("isaid", **overrides), work)
  settings = manifests["train"]["settings"]
  assert settings["data.format"] == "isaid" and settings["data.source_dir"] == str((tmp_path / "src").resolve())
  assert (settings["data.patch_size"], settings["data.patch_stride"], settings["data.num_classes"]) == (16, 16, 16)
  assert settings["data.palette"][1] == [0, 0, 63] and settings["data.mask_format"] == "rgb"
  assert "seed" not in settings  # the split roles depend on data.split_seed, not on the run's seed
  assert (settings["data.val_fraction"], settings["data.test_fraction"], settings["data.split_seed"]) == (0.1, 0.1, 0)
  shard = work / "data/train" / records.shard_filename(0)
  before = shard.stat().st_mtime_ns
  with pytest.raises(splits.PrepareError) as error:
    prepare.run(load_config("isaid", **overrides | {"data.patch_size": 32, "data.patch_stride": 8}), work)
  message = str(error.value)
  assert message.startswith(f"{work / 'data/train/manifest.json'} was prepared with other settings: ")
  assert "data.patch_size 16 -> 32" in message and "data.patch_stride 16 -> 8" in message
  assert f"use a fresh --workdir, or delete {work / 'data'}" in message and "\n" not in message
  assert shard.stat().st_mtime_ns == before
  capsys.readouterr()
  prepare.run(load_config("isaid", **overrides | {"seed": 7, "data.patch_stride": 16}), work)  # same data
  assert "(already prepared, skipped)" in capsys.readouterr().out


def test_held_out_splits_record_their_fractions_and_seed(tmp_path):
  write_loveda(tmp_path / "src", {("Train", "Rural"): ["1", "2", "3"]}, size=(16, 16))
  overrides = {"data.source_dir": str(tmp_path / "src"), "data.patch_size": 16, "data.val_fraction": 0.3,
               "data.test_fraction": 0.3}
  prepare.run(load_config("loveda", **overrides), tmp_path / "work")
  with pytest.raises(splits.PrepareError, match=r"data\.split_seed 0 -> 1"):
    prepare.run(load_config("loveda", **overrides, **{"data.split_seed": 1}), tmp_path / "work")
  with pytest.raises(splits.PrepareError, match=r"data\.test_fraction 0\.3 -> 0\.4"):
    prepare.run(load_config("loveda", **{**overrides, "data.test_fraction": 0.4}), tmp_path / "work")
  prepare.run(load_config("loveda", **overrides, seed=1), tmp_path / "work")  # the run's seed: the same data


def test_bad_sources_fail_naming_the_file(tmp_path):
  write_loveda(tmp_path / "src", {("Train", "Rural"): ["1", "2", "3"]}, size=(16, 16))
  save(tmp_path / "src/Train/Rural/masks_png/2.png", np.full((16, 16), 8, np.uint8))
  config = load_config("loveda", **{"data.source_dir": str(tmp_path / "src"), "data.patch_size": 16})
  with pytest.raises(SourceError, match=r"masks_png/2\.png: raw mask values .*8: 256 px"):
    prepare.run(config, tmp_path / "work")
  assert not prepare.is_complete(config, tmp_path / "work")  # nothing half-written passes as done


def test_empty_download_and_ignore_index_clash_are_refused(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(SourceError, match="no train scenes found"):
    prepare.run(load_config("loveda", **{"data.source_dir": str(tmp_path / "empty")}), tmp_path / "w1")
  with pytest.raises(ConfigError, match=r"ignore_index=254: records store no-data as 255"):
    config_check.validate(load_config("loveda", **{"data.ignore_index": 254}))


def test_real_loveda_maps_raw_labels(shared_data, tmp_path, capsys):
  src = shared_data / "loveda"
  config = load_config("loveda", **{"data.source_dir": str(src), "data.patch_size": 512})
  manifests = prepare.run(config, tmp_path)
  assert sum(manifests[split]["num_scenes"] for split in ("train", "val", "test")) == 10
  assert manifests["val"]["num_scenes"] == 1 and manifests["test"]["num_scenes"] == 1  # 0.1 of the ten tiles each
  assert "LoveDA Val/Rural" in capsys.readouterr().out
  seen = set()
  for split in ("train", "val", "test"):
    raw_masks = {}
    for pair in read_split(tmp_path / "data" / split):
      scene, y, x = ID.fullmatch(pair["id"]).group("scene", "y", "x")
      tile = scene.removeprefix("rural_")
      if tile not in raw_masks:
        raw_masks[tile] = (np.asarray(Image.open(src / "Train/Rural/images_png" / f"{tile}.png")),
                           np.asarray(Image.open(src / "Train/Rural/masks_png" / f"{tile}.png")))
      image, raw = (a[int(y):int(y) + 512, int(x):int(x) + 512] for a in raw_masks[tile])
      np.testing.assert_array_equal(pair["image"], image)
      np.testing.assert_array_equal(pair["mask"], loveda_classes(raw))
      seen |= set(np.unique(pair["mask"]).tolist())
      if split == "train":  # mostly no-data train patches are dropped (data.max_no_data_fraction=0.5)
        assert np.mean(pair["mask"] == 255) <= 0.5
    # 1024 px tiles -> 2 x 2 patches; val keeps all of them, train those not mostly no-data.
    expected = {tile: sum(np.mean(mask[y:y + 512, x:x + 512] == 0) <= 0.5 if split == "train" else 1
                          for y in (0, 512) for x in (0, 512)) for tile, (_, mask) in raw_masks.items()}
    assert sum(expected.values()) == manifests[split]["num_examples"]
  assert seen == {0, 1, 2, 3, 4, 5, 6, 255}  # SOURCE.md: the ten masks hold every raw value 0..7


def test_real_isaid_colours_become_classes(shared_data, tmp_path):
  src = shared_data / "isaid"
  # The shared sample has one train scene, too few to hold val out of: refused in one line.
  with pytest.raises(splits.PrepareError, match=r"the val split would hold no scene: 1 train scene"):
    prepare.run(load_config("isaid", **{"data.source_dir": str(src), "data.patch_size": 512}), tmp_path / "refused")
  # Linked (never copied: licence) into a layout with two train scenes: P0005 and P0004.
  layout = {"train": [("train", "P0005"), ("val", "P0004")], "val": [("val", "P0003")]}
  for split, scenes in layout.items():
    (tmp_path / "src" / split / "images").mkdir(parents=True)
    for folder, scene in scenes:
      for name in (f"{scene}.png", f"{scene}_instance_color_RGB.png"):
        (tmp_path / "src" / split / "images" / name).symlink_to(src / folder / "images" / name)
  config = load_config("isaid", **{"data.source_dir": str(tmp_path / "src"), "data.patch_size": 512,
                                   "data.val_fraction": 0.5})
  manifests = prepare.run(config, tmp_path / "work")
  assert manifests["test"]["scenes"] == ["P0003"]
  assert sorted(manifests["train"]["scenes"] + manifests["val"]["scenes"]) == ["P0004", "P0005"]
  palette = np.asarray(config.data.palette, np.uint8)
  folders = {scene: folder for scenes in layout.values() for folder, scene in scenes}
  classes_in = {}
  for split in ("train", "val", "test"):
    for pair in read_split(tmp_path / "work/data" / split):
      scene, y, x = ID.fullmatch(pair["id"]).group("scene", "y", "x")
      folder = src / folders[scene] / "images"
      crop = np.s_[int(y):int(y) + 512, int(x):int(x) + 512]
      np.testing.assert_array_equal(pair["image"], np.asarray(Image.open(folder / f"{scene}.png"))[crop])
      rgb = np.asarray(Image.open(folder / f"{scene}_instance_color_RGB.png"))[crop]
      expected = np.full(rgb.shape[:2], -1)
      for k, colour in enumerate(palette):  # independent of the converter's sorted-key lookup
        expected[(rgb == colour).all(-1)] = k
      np.testing.assert_array_equal(pair["mask"], expected)
      classes_in.setdefault(scene, set()).update(np.unique(pair["mask"]).tolist())
  assert classes_in["P0003"] == {0, 2, 8, 9}  # background, storage_tank, large_vehicle, small_vehicle
  assert classes_in["P0004"] == classes_in["P0005"] == {0, 8, 9}
  # P0003 is 1147 x 1023: the ragged edge is covered by edge-aligned patches.
  assert {p["id"] for p in read_split(tmp_path / "work/data/test") if p["id"].startswith("P0003")} == {
      f"P0003_y{y}_x{x}" for y in (0, 511) for x in (0, 512, 635)}


def test_cli_prepares_the_demo(tmp_path):
  cmd = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", "--mode=prepare",
         f"--workdir={tmp_path}", "--config.data.demo_num_scenes=4", "--config.data.demo_scene_size=96",
         "--config.data.patch_size=32"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  for split, scenes in (("train", 4), ("val", 2), ("test", 4)):
    manifest = json.loads((tmp_path / "data" / split / records.MANIFEST).read_text())
    assert manifest["num_examples"] == scenes * 9 and manifest["source"] == "demo"
    assert (tmp_path / "report" / f"prepare_{split}.png").is_file()
    assert (tmp_path / "report" / f"class_frequency_{split}.png").is_file()
    assert manifest["settings"]["data.demo_num_scenes"] == 4 and manifest["settings"]["data.demo_scene_size"] == 96
  assert "train: 4 scenes -> 36 patches" in result.stdout
