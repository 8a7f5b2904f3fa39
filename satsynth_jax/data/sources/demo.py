"""Procedural "toy aerial" scenes: a dataset that needs no download (configs/demo.py).

A scene is a textured field with water blobs, straight roads, rectangular buildings with
a roof ridge and a cast shadow, tree clumps and a few vehicles on the roads (~0.5% of
pixels, the rare class). Class colours differ but carry per-object and per-pixel noise,
shadows darken the ground without changing its class, and trees overhang roads and
roofs, so the classes are learnable without being separable by colour alone.

`write_source` saves the scenes as PNG pairs in the folder layout
(`{train,val,test}/{images,masks}/`), so prepare converts them through the real folder code path.
Each split's scenes come from their own seed stream of `data.demo_seed`: the test scenes, on
which the experiment's claims are made, are drawn apart from every scene a setting was chosen
on, and another demo_seed reruns the whole demo on other scenes.
"""

from __future__ import annotations

import pathlib
import shutil

import ml_collections
import numpy as np
from skimage import draw, transform

from satsynth_jax.infra import viz

FIELD, ROAD, BUILDING, WATER, TREE, VEHICLE = range(6)
NUM_CLASSES = 6
# Per train scene: val scenes (settings are chosen there) and test scenes (claims are made there).
# Test gets as many scenes as train, so that one scene does not swing its mean.
VAL_SCENES_PER_TRAIN = 0.5
TEST_SCENES_PER_TRAIN = 1.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Low-frequency noise in [0, 1]: a cells x cells random grid upsampled bicubically."""
  coarse = rng.random((cells + 1, cells + 1))
  return np.clip(transform.resize(coarse, (size, size), order=3, mode="reflect"), 0.0, 1.0)


def _band(centre: np.ndarray, direction: np.ndarray, length: float, width: float, size: int):
  """Pixel coordinates of a rotated rectangle (rows, cols) clipped to the scene."""
  normal = np.array([-direction[1], direction[0]])
  half_l, half_w = direction * length / 2, normal * width / 2
  corners = np.stack([centre - half_l - half_w, centre + half_l - half_w,
                      centre + half_l + half_w, centre - half_l + half_w])
  return draw.polygon(corners[:, 0], corners[:, 1], shape=(size, size))


def _paint(image: np.ndarray, where, rgb, rng: np.random.Generator, noise: float) -> None:
  rows, cols = where
  image[rows, cols] = np.asarray(rgb, np.float32) + rng.normal(0.0, noise, (len(rows), 3))


def _field(rng: np.random.Generator, size: int) -> np.ndarray:
  """Parcels of crops: two base hues blended by smooth noise, row stripes and grain."""
  hues = np.array([[150, 172, 92], [178, 158, 108], [120, 150, 80]], np.float32)
  a, b = hues[rng.choice(len(hues), 2, replace=False)]
  blend = _smooth_noise(rng, size, 3)[..., None]
  rows, cols = np.indices((size, size))
  angle = rng.uniform(0, np.pi)
  stripes = np.sin((rows * np.cos(angle) + cols * np.sin(angle)) * rng.uniform(0.6, 1.2))[..., None]
  return a * blend + b * (1 - blend) + 7.0 * stripes + rng.normal(0.0, 6.0, (size, size, 3))


def _water(rng, size, image, mask) -> None:
  for _ in range(rng.integers(0, 3)):
    centre = rng.uniform(0.15, 0.85, 2) * size
    for _ in range(rng.integers(3, 7)):
      offset = rng.normal(0.0, size * 0.06, 2)
      radii = rng.uniform(0.05, 0.12, 2) * size
      rows, cols = draw.ellipse(*(centre + offset), *radii, shape=(size, size), rotation=rng.uniform(0, np.pi))
      mask[rows, cols] = WATER
  rows, cols = np.nonzero(mask == WATER)
  depth = _smooth_noise(rng, size, 2)[rows, cols, None]
  image[rows, cols] = np.array([38, 72, 112]) + 20.0 * depth + rng.normal(0.0, 2.5, (len(rows), 3))


def _roads(rng, size, image, mask) -> list[tuple[np.ndarray, np.ndarray, float]]:
  """Straight roads crossing the scene; returns (centre, direction, width) for placing vehicles."""
  roads = []
  for _ in range(rng.integers(1, 4)):
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    centre = rng.uniform(0.2, 0.8, 2) * size
    width = rng.uniform(6, 12)
    where = _band(centre, direction, 3 * size, width, size)
    mask[where] = ROAD
    _paint(image, where, rng.normal(122, 6, 3), rng, 5.0)
    for t in np.arange(-1.5 * size, 1.5 * size, 10.0):  # dashed centre line: texture, still road
      _paint(image, _band(centre + direction * t, direction, 5, 1.2, size), (205, 205, 195), rng, 6.0)
    roads.append((centre, direction, width))
  return roads


def _buildings(rng, size, image, mask) -> None:
  roofs = np.array([[172, 78, 58], [152, 150, 160], [96, 92, 104], [204, 192, 178]], np.float32)
  for _ in range(rng.integers(6, 16)):
    h, w = rng.integers(8, 26, 2)
    top, left = rng.integers(0, size - h), rng.integers(0, size - w)
    footprint = mask[top:top + h, left:left + w]
    if np.mean(footprint != FIELD) > 0.05:  # keep buildings on open ground
      continue
    # Shadow to the lower right darkens whatever ground it falls on; its class stays.
    shade = rng.integers(2, 5)
    shadow = image[top + shade:top + h + shade, left + shade:left + w + shade]
    shadow *= 0.55
    roof = roofs[rng.integers(len(roofs))] + rng.normal(0, 10, 3)
    block = np.broadcast_to(roof, (h, w, 3)).copy()
    if h > w:  # gable roof: one side of the ridge catches less light
      block[:, : w // 2] *= 0.82
    else:
      block[: h // 2] *= 0.82
    image[top:top + h, left:left + w] = block + rng.normal(0, 4, (h, w, 3))
    mask[top:top + h, left:left + w] = BUILDING


def _trees(rng, size, image, mask) -> None:
  canopy = np.zeros((size, size), bool)
  for _ in range(rng.integers(3, 10)):
    centre = rng.uniform(0, size, 2)
    for _ in range(rng.integers(3, 12)):
      rows, cols = draw.disk(centre + rng.normal(0, 7, 2), rng.uniform(2, 6), shape=(size, size))
      canopy[rows, cols] = True
  canopy &= mask != WATER
  rows, cols = np.nonzero(canopy)
  leaf = _smooth_noise(rng, size, 24)[rows, cols, None]
  image[rows, cols] = np.array([34, 84, 38]) + 45.0 * leaf + rng.normal(0, 12, (len(rows), 3))
  mask[canopy] = TREE


def _vehicles(rng, size, image, mask, roads) -> None:
  colors = np.array([[200, 30, 30], [235, 235, 235], [30, 60, 180], [25, 25, 25], [230, 200, 40]], np.float32)
  target = rng.poisson(0.005 * size * size / 19) if roads else 0  # ~19 px per vehicle -> ~0.5% of pixels
  placed = 0
  for _ in range(20 * target):  # rejection sampling: most of a road's length lies outside the scene
    if placed == target:
      break
    centre, direction, width = roads[rng.integers(len(roads))]
    lane = np.array([-direction[1], direction[0]]) * width / 4 * rng.choice([-1, 1])
    spot = centre + direction * rng.uniform(-1.5 * size, 1.5 * size) + lane
    if not np.all((spot >= 0) & (spot < size)):
      continue
    rows, cols = _band(spot, direction, rng.uniform(5, 7.5), 3.2, size)
    on_road = mask[rows, cols] == ROAD
    rows, cols = rows[on_road], cols[on_road]
    _paint(image, (rows, cols), colors[rng.integers(len(colors))], rng, 8.0)
    mask[rows, cols] = VEHICLE
    placed += 1


def generate_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """One toy scene: (uint8 RGB [size, size, 3], uint8 classes [size, size])."""
  image = _field(rng, size).astype(np.float32)
  mask = np.full((size, size), FIELD, np.uint8)
  _water(rng, size, image, mask)
  roads = _roads(rng, size, image, mask)
  _buildings(rng, size, image, mask)
  _trees(rng, size, image, mask)
  _vehicles(rng, size, image, mask, roads)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def scene_counts(num_train: int) -> dict[str, int]:
  return {"train": num_train, "val": max(2, round(num_train * VAL_SCENES_PER_TRAIN)),
          "test": max(4, round(num_train * TEST_SCENES_PER_TRAIN))}


def write_source(config: ml_collections.ConfigDict, root: pathlib.Path) -> pathlib.Path:
  """Draw the demo scenes (deterministic in data.demo_seed) as `<root>/{train,val,test}/{images,masks}/*.png`."""
  data = config.data
  if data.num_classes != NUM_CLASSES:
    raise ValueError(f"config.data.num_classes={data.num_classes}: the demo scenes have {NUM_CLASSES} classes")
  root = pathlib.Path(root)
  shutil.rmtree(root, ignore_errors=True)  # a smaller rerun must not inherit stale scenes
  for split_index, (split, count) in enumerate(scene_counts(data.demo_num_scenes).items()):
    for i in range(count):
      image, mask = generate_scene(np.random.default_rng((data.demo_seed, split_index, i)), data.demo_scene_size)
      viz.save_png(image, root / split / "images" / f"scene_{i:03d}.png")
      viz.save_png(mask, root / split / "masks" / f"scene_{i:03d}.png")
  return root
