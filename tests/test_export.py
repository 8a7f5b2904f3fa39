"""--mode=export: a set as PNG folders that data.format=folder reads back with identical pixels."""

import dataclasses
import json
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from satsynth_jax.data import records
from satsynth_jax.data.sources import folder, scenes
from satsynth_jax.infra import viz, workdir as layout
from satsynth_jax.jobs import export
from test_records import make_pairs


def palette(k: int) -> list[tuple[int, int, int]]:
  return [(i % 256, (7 * i) % 256, (i // 256) * 40) for i in range(k)]


def folder_config(k: int, source_dir) -> ml_collections.ConfigDict:
  """The data.format=folder settings classes.json's read_back names."""
  return load_config("default", **{
      "data.format": "folder", "data.source_dir": str(source_dir), "data.mask_format": "index",
      "data.num_classes": k, "data.class_names": tuple(map(str, range(k))), "data.palette": tuple(palette(k)),
      "data.ignore_index": records.ignore_value(k), "data.label_offset": 0, "data.ignore_raw_values": ()})


def write_set(directory, n=5, k=6, seed=0, source="toy"):
  pairs = [dataclasses.replace(p, source=source) for p in make_pairs(n, num_classes=k, seed=seed)]
  records.write_records(directory, pairs, num_classes=k, class_names=[str(i) for i in range(k)], source=source,
                        examples_per_shard=2)
  return pairs


@pytest.mark.parametrize("k", [6, 300])  # uint8 masks; uint16 masks (K > 255, no-data 65535)
def test_export_round_trips_through_the_folder_reader(tmp_path, k):
  pairs = write_set(tmp_path / "set", k=k)
  out = tmp_path / "out"
  info = export.export_set(tmp_path / "set", out, palette=palette(k), threads=2)

  data = folder_config(k, out).data
  inventory = folder.find_scenes(out, data)
  assert not inventory.missing
  assert [s.scene_id for s in inventory.scenes] == [p.id for p in pairs]
  source = records.PairSource(tmp_path / "set")
  for i, scene in enumerate(inventory.scenes):
    image, mask = scenes.load_scene(scene, data)
    stored = source[i]
    np.testing.assert_array_equal(image, stored["image"])
    assert mask.dtype == stored["mask"].dtype == (np.uint8 if k <= 255 else np.uint16)
    np.testing.assert_array_equal(mask, stored["mask"])
    assert (mask == records.ignore_value(k)).any()  # no-data survives as no-data
    preview = np.asarray(Image.open(out / "previews" / f"{scene.scene_id}.png"))
    np.testing.assert_array_equal(preview, viz.colorize(stored["mask"], palette(k), records.ignore_value(k)))

  assert json.loads((out / "classes.json").read_text()) == info
  assert info["num_classes"] == k and info["num_examples"] == 5 and info["class_names"] == list(map(str, range(k)))
  assert info["palette"] == [list(c) for c in palette(k)] and info["ignore_value"] == records.ignore_value(k)
  assert info["read_back"]["data.source_dir"] == str(out)
  # Built beside the output and renamed: no staging folder or temp file is left behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "set"]
  assert sorted(p.name for p in out.iterdir()) == ["classes.json", "images", "masks", "previews"]
  assert all(len(list((out / f).iterdir())) == 5 for f in export.FOLDERS)


def test_readme_numpy_loader_reads_an_export(tmp_path):
  pairs = write_set(tmp_path / "set")
  out = tmp_path / "out"
  export.export_set(tmp_path / "set", out, palette=palette(6))
  # The README's snippet, as a user would paste it.
  import pathlib

  root = pathlib.Path(out)
  classes = json.loads((root / "classes.json").read_text())
  ids = sorted(p.stem for p in (root / "images").glob("*.png"))
  image = np.asarray(Image.open(root / "images" / f"{ids[0]}.png"))  # uint8 [H, W, 3]
  mask = np.asarray(Image.open(root / "masks" / f"{ids[0]}.png"))  # class index [H, W]
  valid = mask != classes["ignore_value"]

  np.testing.assert_array_equal(image, pairs[0].image)
  np.testing.assert_array_equal(mask, pairs[0].mask)
  assert valid.sum() == (pairs[0].mask != 255).sum() and classes["class_names"] == list("012345")


def test_readme_torch_dataset_reads_an_export(tmp_path):
  torch = pytest.importorskip("torch", reason="the README's torch snippet needs torch (pip install -e .[bench])")
  pairs = write_set(tmp_path / "set", k=300)
  export.export_set(tmp_path / "set", tmp_path / "out", palette=palette(300))
  import pathlib

  # The README's snippet.
  class ExportedPairs(torch.utils.data.Dataset):
    def __init__(self, root):
      self.root = pathlib.Path(root)
      self.ids = sorted(p.stem for p in (self.root / "images").glob("*.png"))

    def __len__(self):
      return len(self.ids)

    def __getitem__(self, i):
      image = np.array(Image.open(self.root / "images" / f"{self.ids[i]}.png"))
      mask = np.asarray(Image.open(self.root / "masks" / f"{self.ids[i]}.png")).astype(np.int64)
      return torch.from_numpy(image).permute(2, 0, 1).float() / 255, torch.from_numpy(mask)

  dataset = ExportedPairs(tmp_path / "out")
  assert len(dataset) == 5
  image, mask = dataset[1]
  np.testing.assert_array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), pairs[1].image)
  np.testing.assert_array_equal(mask.numpy(), pairs[1].mask)


def workdir_with_sets(tmp_path):
  workdir = tmp_path / "work"
  sets = {"train": write_set(layout.data_dir(workdir, "train"), n=3, seed=1),
          "val": write_set(layout.data_dir(workdir, "val"), n=2, seed=2),
          "diffusion": write_set(layout.synthetic_dir(workdir, "diffusion"), n=4, seed=3, source="synthetic:8"),
          "curated": write_set(layout.synthetic_dir(workdir, "curated"), n=2, seed=4, source="synthetic:8")}
  return workdir, sets


def run_config(k=6, **export_block):
  config = load_config("default", **{"data.num_classes": k, "data.class_names": tuple(map(str, range(k))),
                                     "data.palette": tuple(palette(k))})
  if export_block:
    config.export = ml_collections.ConfigDict(export_block)
  return config


@pytest.mark.parametrize("name, expected", [("train", "train"), ("val", "val"), ("curated", "curated"),
                                            ("", "diffusion")])  # "": the set this config samples
def test_run_exports_the_configured_set(tmp_path, capsys, name, expected):
  workdir, sets = workdir_with_sets(tmp_path)
  export.run(run_config(set=name), workdir)
  out = layout.export_dir(workdir, expected)
  assert sorted(p.stem for p in (out / "masks").iterdir()) == [p.id for p in sets[expected]]
  for pair in sets[expected]:
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{pair.id}.png")), pair.mask)
  assert f"export: {len(sets[expected])} pairs" in capsys.readouterr().out


def test_run_without_an_export_block_exports_the_sampled_set(tmp_path):
  workdir, sets = workdir_with_sets(tmp_path)
  export.run(run_config(), workdir)
  assert len(list((layout.export_dir(workdir, "diffusion") / "images").iterdir())) == len(sets["diffusion"])


def test_a_new_export_replaces_the_old_one_whole(tmp_path):
  workdir, sets = workdir_with_sets(tmp_path)
  export.run(run_config(set="train"), workdir)
  records.write_records(layout.data_dir(workdir, "train"), make_pairs(2, seed=9)[1:], num_classes=6,
                        class_names=list("012345"), source="toy", examples_per_shard=2, overwrite=True)
  export.run(run_config(set="train"), workdir)
  # Only the new set's pairs: stale files of the earlier export would be read back as pairs.
  assert [p.name for p in (layout.export_dir(workdir, "train") / "images").iterdir()] == ["tile_001.png"]
  assert sorted(p.name for p in layout.export_dir(workdir, "train").parent.iterdir()) == ["train"]


def test_user_mistakes_are_one_line_errors(tmp_path):
  workdir, _ = workdir_with_sets(tmp_path)
  with pytest.raises(export.ExportError, match=r"config.export.set='nope'.*has: train, val, curated, diffusion"):
    export.run(run_config(set="nope"), workdir)
  with pytest.raises(export.ExportError, match=r"config.export.set='a/b' is not a set name"):
    export.run(run_config(set="a/b"), workdir)
  config = run_config(set="train")
  config.data.palette = tuple(palette(5))
  with pytest.raises(export.ExportError, match=r"config.data.palette has 5 colours but .*train has 6 classes"):
    export.run(config, workdir)
  mine = layout.export_dir(workdir, "val")
  mine.mkdir(parents=True)
  export.run(run_config(set="val"), workdir)  # an empty folder is simply filled
  assert len(list((mine / "images").iterdir())) == 2
  shutil.rmtree(mine)
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(export.ExportError, match=r"holds no classes.json, so it is not an export"):
    export.run(run_config(set="val"), workdir)
  assert (mine / "notes.txt").read_text() == "keep me"
  export.export_set(layout.data_dir(workdir, "train"), tmp_path / "copy", palette=palette(6))
  with pytest.raises(export.ExportError, match=r"already holds an export; delete it or pass overwrite=True"):
    export.export_set(layout.data_dir(workdir, "train"), tmp_path / "copy", palette=palette(6))


def test_ids_that_are_no_file_names_are_refused(tmp_path):
  bad = dataclasses.replace(make_pairs(1)[0], id="scene/0_0")
  records.write_records(tmp_path / "set", [bad], num_classes=6, class_names=list("012345"), source="toy",
                        examples_per_shard=2)
  with pytest.raises(export.ExportError, match=r"shard-00000.tfrecord: record 0: pair id 'scene/0_0' is not usable"):
    export.export_set(tmp_path / "set", tmp_path / "out", palette=palette(6))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # the partial export is removed
