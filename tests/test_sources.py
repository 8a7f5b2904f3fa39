"""Converters: each official layout is found, read and mapped to classes; bad input is named.

The `write_*` builders lay out tiny synthetic downloads in each dataset's official layout
and return what prepare must produce from them: {scene_id: (image, class mask)}.
test_prepare.py reuses them.
"""

from __future__ import annotations

import pathlib
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import load_config
from satsynth_jax.data.sources import demo, folder, isaid, loveda, openearthmap, scenes as scene_io
from satsynth_jax.data.sources.scenes import SourceError

ISAID_PALETTE = np.asarray(load_config("isaid").data.palette, np.uint8)
Expected = dict[str, tuple[np.ndarray, np.ndarray]]


def save(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".tif":
    tifffile.imwrite(path, array)
  else:
    Image.fromarray(array).save(path)
  return path


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_isaid(root: pathlib.Path, sizes: dict[str, dict[str, tuple[int, int]]], seed: int = 0) -> Expected:
  """`<root>/<split>/images/<id>.png` + `<id>_instance_color_RGB.png` (palette colours)."""
  rng, expected = np.random.default_rng(seed), {}
  for split, scenes in sizes.items():
    for scene_id, (h, w) in scenes.items():
      image, classes = random_image(rng, h, w), rng.integers(0, 16, (h, w)).astype(np.uint8)
      save(root / split / "images" / f"{scene_id}.png", image)
      save(root / split / "images" / f"{scene_id}_instance_color_RGB.png", ISAID_PALETTE[classes])
      expected[scene_id] = image, classes
  return expected


def loveda_classes(raw: np.ndarray) -> np.ndarray:
  """The official mapping: raw 1..7 -> 0..6, raw 0 (no-data) -> 255."""
  return np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)


def write_loveda(root: pathlib.Path, parts: dict[tuple[str, str], list[str]], size=(32, 40), seed=0) -> Expected:
  """`<root>/<Train|Val>/<Urban|Rural>/{images_png,masks_png}/<id>.png` with raw labels 0..7."""
  rng, expected = np.random.default_rng(seed), {}
  for (split_dir, domain), ids in parts.items():
    for tile_id in ids:
      image, raw = random_image(rng, *size), rng.integers(0, 8, size).astype(np.uint8)
      save(root / split_dir / domain / "images_png" / f"{tile_id}.png", image)
      save(root / split_dir / domain / "masks_png" / f"{tile_id}.png", raw)
      expected[f"{domain.lower()}_{tile_id}"] = image, loveda_classes(raw)
  return expected


def write_openearthmap(root: pathlib.Path, splits: dict[str, list[str]], size=(32, 32), seed=0) -> Expected:
  """`<root>/<region>/{images,labels}/<region>_<n>.tif` GeoTIFF-style files and `<split>.txt` lists."""
  rng, expected = np.random.default_rng(seed), {}
  for split, names in splits.items():
    (root / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
    for name in names:
      region = name.rsplit("_", 1)[0]
      image, raw = random_image(rng, *size), rng.integers(0, 9, size).astype(np.uint8)
      save(root / region / "images" / name, image)
      save(root / region / "labels" / name, raw)
      expected[pathlib.Path(name).stem] = image, np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)
  return expected


def data_config(name: str, **overrides):
  return load_config(name, **{f"data.{k}": v for k, v in overrides.items()}).data


def test_isaid_finds_color_masks_and_skips_instance_id_masks(tmp_path):
  write_isaid(tmp_path, {"train": {"P0001": (8, 8)}, "val": {"P0002": (8, 8)}})
  save(tmp_path / "train/images/P0001_instance_id_RGB.png", np.zeros((8, 8, 3), np.uint8))
  save(tmp_path / "val/images/P0009.png", np.zeros((8, 8, 3), np.uint8))  # no mask (like test images)
  inventory = isaid.find_scenes(tmp_path, data_config("isaid"))
  assert [(s.split, s.scene_id, s.mask_path.name, s.mask_format) for s in inventory.scenes] == [
      ("train", "P0001", "P0001_instance_color_RGB.png", "rgb"),
      ("val", "P0002", "P0002_instance_color_RGB.png", "rgb")]
  assert inventory.missing == ("iSAID val: 1 image(s) without _instance_color_RGB.png mask (P0009.png)",)


def test_isaid_rgb_masks_decode_to_palette_indices(tmp_path):
  expected = write_isaid(tmp_path, {"val": {"P0003": (12, 9)}})
  (scene,) = isaid.find_scenes(tmp_path, data_config("isaid")).scenes
  image, mask = scene_io.load_scene(scene, data_config("isaid"))
  np.testing.assert_array_equal(image, expected["P0003"][0])
  np.testing.assert_array_equal(mask, expected["P0003"][1])
  assert mask.dtype == np.uint8


def test_rgb_decoding_is_blockwise_exact(monkeypatch):
  rng = np.random.default_rng(1)
  classes = rng.integers(0, 16, (37, 11))
  monkeypatch.setattr(scene_io, "RGB_BLOCK_PIXELS", 30)  # ~3 rows per block: many blocks, a ragged last one
  decoded = scene_io.rgb_to_classes(ISAID_PALETTE[classes], palette=ISAID_PALETTE, ignore_index=255,
                                   path=pathlib.Path("m.png"))
  np.testing.assert_array_equal(decoded, classes)


def test_unknown_rgb_colour_names_file_colour_and_count(tmp_path):
  write_isaid(tmp_path, {"train": {"P0001": (10, 10)}})
  mask_path = tmp_path / "train/images/P0001_instance_color_RGB.png"
  rgb = np.asarray(Image.open(mask_path)).copy()
  rgb[:2, :3] = (1, 2, 3)  # 6 px of a colour no class has
  save(mask_path, rgb)
  (scene,) = isaid.find_scenes(tmp_path, data_config("isaid")).scenes
  with pytest.raises(SourceError) as error:
    scene_io.load_scene(scene, data_config("isaid"))
  assert str(mask_path) in str(error.value)
  assert "(1, 2, 3): 6 px" in str(error.value)


def test_size_mismatch_names_both_files_and_sizes(tmp_path):
  write_isaid(tmp_path, {"train": {"P0001": (10, 12)}})
  image_path = save(tmp_path / "train/images/P0001.png", np.zeros((10, 13, 3), np.uint8))
  (scene,) = isaid.find_scenes(tmp_path, data_config("isaid")).scenes
  with pytest.raises(SourceError) as error:
    scene_io.load_scene(scene, data_config("isaid"))
  message = str(error.value)
  assert f"image {image_path} is 13x10" in message
  assert f"mask {scene.mask_path} is 12x10" in message


def test_loveda_maps_raw_labels_and_lists_missing_domains(tmp_path):
  expected = write_loveda(tmp_path, {("Train", "Rural"): ["3", "4"], ("Val", "Urban"): ["2600"]})
  data = data_config("loveda")
  inventory = loveda.find_scenes(tmp_path, data)
  assert [(s.split, s.scene_id) for s in inventory.scenes] == [
      ("train", "rural_3"), ("train", "rural_4"), ("val", "urban_2600")]
  assert inventory.missing == ("LoveDA Train/Urban", "LoveDA Val/Rural")
  for scene in inventory.scenes:
    image, mask = scene_io.load_scene(scene, data)
    np.testing.assert_array_equal(image, expected[scene.scene_id][0])
    np.testing.assert_array_equal(mask, expected[scene.scene_id][1])


def test_loveda_reports_images_without_masks(tmp_path):
  write_loveda(tmp_path, {("Train", "Rural"): ["1"]})
  save(tmp_path / "Train/Rural/images_png/2.png", np.zeros((4, 4, 3), np.uint8))
  inventory = loveda.find_scenes(tmp_path, data_config("loveda"))
  assert [s.scene_id for s in inventory.scenes] == ["rural_1"]
  assert "LoveDA Train/Rural: 1 image(s) without a mask (2.png)" in inventory.missing


def test_out_of_range_class_values_name_file_and_values(tmp_path):
  write_loveda(tmp_path, {("Train", "Rural"): ["5"]}, size=(6, 6))
  mask_path = tmp_path / "Train/Rural/masks_png/5.png"
  raw = np.asarray(Image.open(mask_path)).copy()
  raw[0, :4] = 9  # LoveDA has raw labels 0..7 only
  raw[1, 0] = 200
  save(mask_path, raw)
  (scene,) = loveda.find_scenes(tmp_path, data_config("loveda")).scenes
  with pytest.raises(SourceError) as error:
    scene_io.load_scene(scene, data_config("loveda"))
  message = str(error.value)
  assert str(mask_path) in message
  assert "9: 4 px, 200: 1 px" in message
  assert "label_offset=-1" in message


def test_openearthmap_reads_geotiffs_by_split_list(tmp_path):
  expected = write_openearthmap(tmp_path, {"train": ["aachen_1.tif", "kyoto_2.tif"], "val": ["aachen_7.tif"]})
  (tmp_path / "val.txt").write_text("aachen_7.tif\nchiclayo_3.tif\n")  # listed, but not downloaded
  data = data_config("openearthmap")
  inventory = openearthmap.find_scenes(tmp_path, data)
  assert [(s.split, s.scene_id) for s in inventory.scenes] == [
      ("train", "aachen_1"), ("train", "kyoto_2"), ("val", "aachen_7")]
  assert inventory.missing == (
      "OpenEarthMap val: 1 listed file(s) without both image and label (chiclayo_3.tif)",)
  for scene in inventory.scenes:
    image, mask = scene_io.load_scene(scene, data)
    np.testing.assert_array_equal(image, expected[scene.scene_id][0])
    np.testing.assert_array_equal(mask, expected[scene.scene_id][1])


def test_band_sequential_tiff_is_read_as_rgb(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  path = tmp_path / "planar.tif"
  tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate")
  np.testing.assert_array_equal(scene_io.read_image(path), image)


def test_images_are_brought_to_rgb_and_high_bit_depth_is_refused(tmp_path):
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(scene_io.read_image(save(tmp_path / "g.png", grey)), np.stack([grey] * 3, -1))
  rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
  np.testing.assert_array_equal(scene_io.read_image(save(tmp_path / "a.png", rgba)), rgba[..., :3])
  deep = tmp_path / "deep.tif"
  tifffile.imwrite(deep, np.zeros((3, 4, 3), np.uint16))
  with pytest.raises(SourceError, match=r"deep\.tif: image has dtype uint16"):
    scene_io.read_image(deep)


def declare_tiff_size(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
  """Rewrite a little-endian TIFF's ImageWidth/ImageLength tags (as LONGs); the pixel data stays tiny."""
  data = bytearray(path.read_bytes())
  assert data[:4] == b"II*\0"
  (ifd,) = struct.unpack_from("<I", data, 4)
  (count,) = struct.unpack_from("<H", data, ifd)
  for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
    (tag,) = struct.unpack_from("<H", data, entry)
    if tag in (256, 257):  # ImageWidth, ImageLength
      struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
  path.write_bytes(bytes(data))
  return path


def declare_png_size(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
  """Rewrite a PNG's IHDR width/height (with a valid CRC); the pixel data stays tiny."""
  data = bytearray(path.read_bytes())
  assert data[12:16] == b"IHDR"
  struct.pack_into(">II", data, 16, width, height)
  struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
  path.write_bytes(bytes(data))
  return path


def test_tiff_declaring_a_huge_size_is_refused_from_its_header_without_allocating(tmp_path):
  path = tmp_path / "bomb.tif"
  tifffile.imwrite(path, np.zeros((4, 4), np.uint8), metadata=None)
  declare_tiff_size(path, 100_000, 100_000)  # 1e10 px: ~9.3 GiB as uint8, 28 GiB as RGB
  tracemalloc.start()
  try:
    for read in (scene_io.read_image, scene_io.read_index_mask, scene_io.read_rgb_mask, scene_io.image_size):
      with pytest.raises(SourceError) as error:
        read(path)
      message = str(error.value)
      assert str(path) in message and "100000x100000 px" in message
      assert f"limit of {Image.MAX_IMAGE_PIXELS} pixels" in message
      assert "config.data.max_image_pixels to at least 10000000000" in message
    assert tracemalloc.get_traced_memory()[1] < 50 * 2**20
  finally:
    tracemalloc.stop()


def test_png_declaring_a_huge_size_is_refused_with_the_same_message(tmp_path):
  path = declare_png_size(save(tmp_path / "bomb.png", np.zeros((4, 4, 3), np.uint8)), 100_000, 100_000)
  with pytest.raises(SourceError, match=r"bomb\.png: header declares 100000x100000 px .*max_image_pixels"):
    scene_io.read_image(path)
  assert Image.MAX_IMAGE_PIXELS == 5 * 10**8  # Pillow's own guard, lifted for the header, is back


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_max_image_pixels_raises_pillows_limit_for_every_format(tmp_path, monkeypatch, suffix):
  image = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)  # 600 px
  path = save(tmp_path / f"scene{suffix}", image)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 px is even over Pillow's 2x hard limit
  with pytest.raises(SourceError, match=r"20x30 px \(600 pixels\), over the limit of 100 pixels"):
    scene_io.read_image(path)
  np.testing.assert_array_equal(scene_io.read_image(path, max_pixels=600), image)
  assert scene_io.image_size(path, max_pixels=600) == (30, 20)
  with pytest.raises(SourceError, match="over the limit of 599 pixels"):
    scene_io.read_image(path, max_pixels=599)


def test_load_scene_reads_the_limit_from_the_config(tmp_path):
  expected = write_isaid(tmp_path, {"train": {"P0001": (12, 10)}})
  (scene,) = isaid.find_scenes(tmp_path, data_config("isaid")).scenes
  with pytest.raises(SourceError, match=r"P0001\.png: header declares 10x12 px"):
    scene_io.load_scene(scene, data_config("isaid", max_image_pixels=100))
  image, _ = scene_io.load_scene(scene, data_config("isaid", max_image_pixels=120))
  np.testing.assert_array_equal(image, expected["P0001"][0])
  assert scene_io.scene_size(scene, data_config("isaid")) == (12, 10)


def test_colour_mask_in_index_mode_says_to_switch_mask_format(tmp_path):
  path = save(tmp_path / "m.png", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(SourceError, match=r"m\.png: index mask .*config\.data\.mask_format='rgb'"):
    scene_io.read_index_mask(path)


def test_folder_flat_and_split_layouts(tmp_path):
  flat = tmp_path / "flat"
  for stem in ("b", "a"):
    save(flat / "images" / f"{stem}.jpg", np.zeros((4, 4, 3), np.uint8))
    save(flat / "masks" / f"{stem}.png", np.zeros((4, 4), np.uint8))
  save(flat / "masks" / "orphan.png", np.zeros((4, 4), np.uint8))
  inventory = folder.find_scenes(flat, data_config("default"))
  assert [(s.split, s.scene_id, s.image_path.name, s.mask_format) for s in inventory.scenes] == [
      ("train", "a", "a.jpg", "index"), ("train", "b", "b.jpg", "index")]
  assert any("orphan.png" in note for note in inventory.missing)

  split = tmp_path / "split"
  for name in ("train", "val"):
    save(split / name / "images" / f"{name}0.png", np.zeros((4, 4, 3), np.uint8))
    save(split / name / "masks" / f"{name}0.png", np.zeros((4, 4, 3), np.uint8))
  inventory = folder.find_scenes(split, data_config("default", mask_format="rgb"))
  assert [(s.split, s.scene_id, s.mask_format) for s in inventory.scenes] == [
      ("train", "train0", "rgb"), ("val", "val0", "rgb")]
  assert inventory.missing == ()


def test_index_mapping_ignores_listed_values_and_keeps_ignore_index():
  raw = np.array([[0, 1, 2], [3, 255, 0]], np.uint8)
  mapped = scene_io.index_to_classes(raw, label_offset=0, ignore_raw_values=(3,), num_classes=3,
                                    ignore_index=255, path=pathlib.Path("m.png"))
  np.testing.assert_array_equal(mapped, [[0, 1, 2], [255, 255, 0]])


def test_missing_source_dir_is_named(tmp_path):
  with pytest.raises(SourceError, match=r"config\.data\.source_dir='.*nowhere' is not a directory"):
    loveda.find_scenes(tmp_path / "nowhere", data_config("loveda"))


def test_demo_scenes_are_deterministic_and_every_class_appears():
  a = [demo.generate_scene(np.random.default_rng((0, 0, i)), 96) for i in range(6)]
  b = [demo.generate_scene(np.random.default_rng((0, 0, i)), 96) for i in range(6)]
  other = demo.generate_scene(np.random.default_rng((1, 0, 0)), 96)
  for (image_a, mask_a), (image_b, mask_b) in zip(a, b):
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)
  assert not np.array_equal(a[0][0], other[0])
  counts = np.bincount(np.concatenate([m.ravel() for _, m in a]), minlength=demo.NUM_CLASSES)
  assert len(counts) == demo.NUM_CLASSES and (counts > 0).all()
  assert counts[demo.VEHICLE] / counts.sum() < 0.03  # the rare class
  assert counts[demo.FIELD] == counts.max()


def test_demo_classes_overlap_in_colour_but_differ_on_average():
  """Learnable (class means apart) but not trivial (noise makes single pixels ambiguous)."""
  scenes = [demo.generate_scene(np.random.default_rng((0, 0, i)), 96) for i in range(6)]
  pixels = np.concatenate([image.reshape(-1, 3) for image, _ in scenes]).astype(np.float64)
  classes = np.concatenate([mask.ravel() for _, mask in scenes])
  means = np.stack([pixels[classes == k].mean(0) for k in range(demo.NUM_CLASSES)])
  spreads = np.stack([pixels[classes == k].std(0).mean() for k in range(demo.NUM_CLASSES)])
  gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(demo.NUM_CLASSES, 1)]
  assert gaps.min() > 15  # every pair of classes differs in mean colour
  assert spreads.min() > 4  # and no class is a flat colour


def test_demo_write_source_lays_out_folder_pairs(tmp_path):
  config = load_config("demo", **{"data.demo_num_scenes": 3, "data.demo_scene_size": 48})
  root = demo.write_source(config, tmp_path / "demo_source")
  inventory = folder.find_scenes(root, config.data)
  assert [s.split for s in inventory.scenes].count("train") == 3
  assert [s.split for s in inventory.scenes].count("val") == 2  # a quarter, but at least 2
  image, mask = scene_io.load_scene(inventory.scenes[0], config.data)
  assert image.shape == (48, 48, 3) and mask.shape == (48, 48) and mask.max() < demo.NUM_CLASSES
