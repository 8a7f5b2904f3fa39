"""Report pictures: exact colours where they matter, sane layouts, atomic PNG writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from satsynth_jax.infra import viz

PALETTE = ((0, 0, 0), (255, 0, 0), (0, 0, 255))


def test_colorize_uses_the_palette_and_hatches_ignore():
  mask = np.array([[0, 1, 2], [255, 255, 1]], np.uint8)
  rgb = viz.colorize(mask, PALETTE, 255)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
  np.testing.assert_array_equal(rgb[0], PALETTE)
  np.testing.assert_array_equal(rgb[1, 2], PALETTE[1])
  ignore_colours = {tuple(c) for c in rgb[1, :2]} | {tuple(c) for c in viz.hatch((8, 8)).reshape(-1, 3)}
  assert ignore_colours == {viz.HATCH_DARK, viz.HATCH_LIGHT}
  assert not ignore_colours & set(PALETTE)


def test_colorize_refuses_values_that_are_neither_class_nor_ignore():
  with pytest.raises(ValueError, match=r"mask values \[3, 7\] are neither classes 0..2 nor ignore_index=255"):
    viz.colorize(np.array([[3, 7, 255]]), PALETTE, 255)


def test_pair_grid_puts_each_mask_beside_its_image():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
  masks = [np.full((8, 8), k % 3, np.uint8) for k in range(5)]
  grid = np.asarray(viz.pair_grid(images, masks, PALETTE, 255, columns=2))
  # Cell layout: pad 6, frame 1, image 8, gap 3, mask 8, frame 1 -> pair 21 px wide, 10 px high.
  assert grid.shape == (3 * 10 + 4 * 6, 2 * 21 + 3 * 6, 3)
  for k in range(5):
    top, left = 6 + (k // 2) * 16 + 1, 6 + (k % 2) * 27 + 1
    np.testing.assert_array_equal(grid[top:top + 8, left:left + 8], images[k])
    np.testing.assert_array_equal(grid[top:top + 8, left + 11:left + 19], viz.colorize(masks[k], PALETTE, 255))


def test_pair_grid_scales_masks_without_inventing_colours():
  mask = np.arange(3, dtype=np.uint8).repeat(4).reshape(3, 4)
  mask[0, 0] = 255
  image = np.zeros((3, 4, 3), np.uint8)
  grid = viz.pair_grid([image] * 2, [mask] * 2, PALETTE, 255, tile_size=40, captions=["a", "b"],
                       class_names=("bg", "red", "blue"), title="t")
  colours = {tuple(c) for c in np.asarray(grid).reshape(-1, 3)}
  assert set(PALETTE) <= colours and viz.HATCH_DARK in colours
  assert grid.width > 2 * 80


def test_image_grid_rejects_nothing_to_draw():
  with pytest.raises(ValueError, match="at least one picture"):
    viz.image_grid([], 4)


def test_bar_chart_log_and_linear():
  fractions = [0.97, 0.02, 0.003, 0.0]
  chart = viz.bar_chart(fractions, ["background", "car", "plane", "ship"], "class share", log=True,
                        colors=[(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)])
  pixels = np.asarray(chart)
  counts = {c: np.count_nonzero((pixels == c).all(-1)) for c in [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]}
  # Longer bars for larger values on the log axis; a zero cannot be placed on it and draws no bar.
  assert counts[(255, 0, 0)] > counts[(0, 255, 0)] > 0
  assert counts[(0, 0, 255)] == 0
  linear = np.asarray(viz.bar_chart([1.0, 3.0], ["a", "b"], "linear"))
  blue = (linear == viz.SERIES_COLORS[0]).all(-1).sum(1)
  assert blue.max() > 0 and chart.width == 900


def test_bar_chart_needs_a_value_per_label():
  with pytest.raises(ValueError, match="one value per label"):
    viz.bar_chart([1.0], ["a", "b"], "t")


def test_line_chart_draws_each_series_in_its_colour_and_skips_bad_points():
  steps = np.arange(50)
  chart = viz.line_chart({"loss": (steps, 1.0 / (steps + 1)), "val": (steps[::10], np.full(5, np.nan))},
                         "training", x_label="step", y_label="loss", log_y=True)
  pixels = np.asarray(chart)
  assert chart.size == (900, 500)
  assert (pixels == viz.SERIES_COLORS[0]).all(-1).sum() > 200  # the loss curve
  with pytest.raises(ValueError, match="no finite points"):
    viz.line_chart({"x": ([0, 1], [np.nan, np.inf])}, "empty")


def test_the_legend_leaves_the_end_of_rising_curves_visible():
  """Training curves rise to the top right, where they end (the part people read): the legend box
  goes to the corner the curves leave free."""
  steps = np.arange(100, 1001, 100)
  curves = {"D": [41.2, 47.3, 55, 59.4, 60.1, 60.8, 61.3, 62.0, 62.6, 63.4],
            "D u D' (a set with a long name)": [42.5, 55.1, 57, 59, 60.4, 61.2, 60.8, 61.5, 62, 62.3],
            "D u D'_conditioned (another set with a long name)": [43.5, 51.4, 55, 58.5, 59.9, 60.3, 61, 61.8,
                                                                   62.5, 62.9]}
  chart = np.asarray(viz.line_chart({k: (steps, np.array(v)) for k, v in curves.items()}, "val mIoU"))
  last_steps = chart[:, 860:878]  # the plot's last columns, left of its right edge
  for colour in viz.SERIES_COLORS[:3]:
    assert (last_steps == colour).all(-1).sum() > 5, colour


def test_format_number():
  assert [viz.format_number(v) for v in (0, 0.25, 12000, 1e-5, 3.5e6)] == ["0", "0.25", "12000", "1e-05", "3.5e+06"]


def test_save_png_is_atomic_and_keeps_index_masks(tmp_path):
  mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
  path = viz.save_png(mask, tmp_path / "sub" / "mask.png")
  with Image.open(path) as image:
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), mask)
  viz.save_png(Image.new("RGB", (2, 2), (1, 2, 3)), path)  # replaces in place
  assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
  assert os.listdir(tmp_path / "sub") == ["mask.png"]  # no temp file left behind


def test_log_bars_show_the_smallest_value():
  chart = np.asarray(viz.bar_chart([0.9, 1e-4], ["bg", "car"], "t", log=True, colors=[(0, 0, 0), (255, 0, 0)]))
  assert np.count_nonzero((chart == (255, 0, 0)).all(-1)) > 20  # the axis starts below the minimum


def test_grouped_bar_chart_draws_a_bar_per_series():
  chart = np.asarray(viz.grouped_bar_chart({"real": [0.5, 0.5], "synthetic": [0.25, 0.0]}, ["bg", "car"], "t"))
  real, synthetic = (np.count_nonzero((chart == c).all(-1)) for c in viz.SERIES_COLORS[:2])
  assert real > 1.5 * synthetic > 0  # two half-axis bars vs one quarter-axis bar (plus equal legend swatches)
  with pytest.raises(ValueError, match="one value per label in every series"):
    viz.grouped_bar_chart({"real": [1.0]}, ["a", "b"], "t")
