"""Report pictures with Pillow only: colour-coded masks, image/mask grids, (grouped) bar and line charts.

Every function returns a `PIL.Image.Image` (or an RGB array for `colorize`); `save_png`
writes one atomically. Jobs use these for data previews, sample grids and loss curves.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from satsynth_jax.infra import atomic

Array = np.ndarray
RGB = tuple[int, int, int]

WHITE: RGB = (255, 255, 255)
INK: RGB = (30, 30, 30)
GRID: RGB = (225, 225, 225)
# No-data pixels get a diagonal hatch of two greys: it cannot be mistaken for any palette
# colour (iSAID's background is black, LoveDA's white, OpenEarthMap's roads grey).
HATCH_DARK: RGB = (48, 48, 48)
HATCH_LIGHT: RGB = (112, 112, 112)
# Line colours (Tableau 10): distinguishable and colour-blind tolerant.
SERIES_COLORS: tuple[RGB, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                                  (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                                  (188, 189, 34), (23, 190, 207))


@functools.cache
def font(size: int = 14) -> ImageFont.FreeTypeFont:
  """Pillow's bundled scalable font (no system fonts needed)."""
  return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
  left, top, right, bottom = font(size).getbbox(text)
  return right - left, bottom - top


def colorize(mask: Array, palette: Sequence[Sequence[int]], ignore_index: int) -> Array:
  """Class map [H, W] -> uint8 RGB [H, W, 3]: palette[k] for class k, a grey hatch for ignore_index."""
  mask = np.asarray(mask)
  colors = np.asarray(palette, dtype=np.uint8)
  is_class = (mask >= 0) & (mask < len(colors))
  is_ignore = mask == ignore_index
  bad = ~is_class & ~is_ignore
  if bad.any():
    raise ValueError(f"mask values {np.unique(mask[bad])[:8].tolist()} are neither classes "
                     f"0..{len(colors) - 1} nor ignore_index={ignore_index}")
  rgb = colors[np.where(is_class, mask, 0)]
  if is_ignore.any():
    rgb[is_ignore] = hatch(mask.shape)[is_ignore]
  return rgb


def hatch(shape: tuple[int, int]) -> Array:
  """uint8 RGB [H, W, 3] diagonal stripes, the no-data pattern."""
  rows, cols = np.indices(shape)
  return np.where((((rows + cols) // 3) % 2 == 0)[..., None], HATCH_DARK, HATCH_LIGHT).astype(np.uint8)


def _as_pil(picture: Array | Image.Image) -> Image.Image:
  if isinstance(picture, Image.Image):
    return picture.convert("RGB")
  array = np.asarray(picture)
  if array.dtype != np.uint8:
    raise ValueError(f"expected a uint8 picture, got dtype {array.dtype}")
  return Image.fromarray(array).convert("RGB")


def _fit(picture: Image.Image, size: int | None, nearest: bool) -> Image.Image:
  """Scale the longer side to `size`: NEAREST for masks (no invented colours) and for enlarging
  (shows the true pixels), LANCZOS for shrinking images."""
  if size is None or max(picture.size) == size:
    return picture
  scale = size / max(picture.size)
  new_size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
  resample = Image.Resampling.NEAREST if nearest or scale > 1 else Image.Resampling.LANCZOS
  return picture.resize(new_size, resample)


def image_grid(pictures: Sequence[Array | Image.Image], columns: int, *, pad: int = 4,
               captions: Sequence[str] | None = None, background: RGB = WHITE) -> Image.Image:
  """Pictures row-major in `columns` columns, each cell sized to the largest picture."""
  if not pictures:
    raise ValueError("image_grid needs at least one picture")
  tiles = [_as_pil(p) for p in pictures]
  cell_w = max(t.width for t in tiles)
  caption_h = _text_size("Ag", 12)[1] + 6 if captions else 0
  cell_h = max(t.height for t in tiles) + caption_h
  columns = max(1, min(columns, len(tiles)))
  rows = math.ceil(len(tiles) / columns)
  grid = Image.new("RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
  draw = ImageDraw.Draw(grid)
  for i, tile in enumerate(tiles):
    left = pad + (i % columns) * (cell_w + pad)
    top = pad + (i // columns) * (cell_h + pad)
    grid.paste(tile, (left, top))
    if captions:
      draw.text((left, top + tile.height + 3), _clip_text(captions[i], cell_w, 12), fill=INK, font=font(12))
  return grid


def _clip_text(text: str, width: int, size: int) -> str:
  """Shorten from the left (ids differ at their ends) until it fits `width` pixels."""
  if _text_size(text, size)[0] <= width:
    return text
  while text and _text_size("…" + text, size)[0] > width:
    text = text[1:]
  return "…" + text


def legend(class_names: Sequence[str], palette: Sequence[Sequence[int]], width: int,
           *, with_ignore: bool = False) -> Image.Image:
  """Swatch + name per class, wrapped into rows `width` pixels wide."""
  entries = [(name, tuple(int(v) for v in rgb)) for name, rgb in zip(class_names, palette)]
  if with_ignore:
    entries.append(("no-data", None))
  size, swatch, gap = 13, 14, 14
  row_h = swatch + 8
  placed, x, y = [], 8, 6
  for name, rgb in entries:
    w = swatch + 5 + _text_size(name, size)[0]
    if x + w > width - 8 and x > 8:
      x, y = 8, y + row_h
    placed.append((x, y, name, rgb))
    x += w + gap
  panel = Image.new("RGB", (width, y + row_h + 4), WHITE)
  draw = ImageDraw.Draw(panel)
  for x, y, name, rgb in placed:
    box = (x, y, x + swatch - 1, y + swatch - 1)
    if rgb is None:
      panel.paste(Image.fromarray(hatch((swatch, swatch))), box[:2])
    else:
      draw.rectangle(box, fill=rgb)
    draw.rectangle(box, outline=INK)
    draw.text((x + swatch + 5, y + swatch // 2), name, fill=INK, font=font(size), anchor="lm")
  return panel


def titled(picture: Image.Image, title: str, *, size: int = 18) -> Image.Image:
  """`picture` under a title band."""
  band = _text_size(title, size)[1] + 14
  out = Image.new("RGB", (picture.width, picture.height + band), WHITE)
  out.paste(picture, (0, band))
  ImageDraw.Draw(out).text((8, band // 2), _clip_text(title, picture.width - 16, size), fill=INK,
                           font=font(size), anchor="lm")
  return out


def stack(pictures: Sequence[Image.Image], background: RGB = WHITE) -> Image.Image:
  """Pictures one above the other, left-aligned."""
  out = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), background)
  top = 0
  for p in pictures:
    out.paste(p, (0, top))
    top += p.height
  return out


def pair_grid(images: Sequence[Array], masks: Sequence[Array], palette: Sequence[Sequence[int]],
              ignore_index: int, columns: int = 4, *, tile_size: int | None = None,
              captions: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
              title: str | None = None) -> Image.Image:
  """Each image beside its colour-coded mask, `columns` pairs per row; optional title and legend."""
  if len(images) != len(masks):
    raise ValueError(f"{len(images)} images but {len(masks)} masks")
  pairs = []
  for image, mask in zip(images, masks):
    left = _fit(_as_pil(image), tile_size, nearest=False)
    right = _fit(_as_pil(colorize(mask, palette, ignore_index)), tile_size, nearest=True)
    # A 1 px frame keeps tiles apart where a palette colour matches the page (LoveDA's white).
    pair = Image.new("RGB", (left.width + right.width + 5, max(left.height, right.height) + 2), GRID)
    pair.paste(left, (1, 1))
    pair.paste(right, (left.width + 4, 1))
    pairs.append(pair)
  grid = image_grid(pairs, columns, pad=6, captions=captions)
  parts = [grid]
  if class_names is not None:
    has_ignore = any(np.any(np.asarray(m) == ignore_index) for m in masks)
    parts.append(legend(class_names, palette, grid.width, with_ignore=has_ignore))
  out = stack(parts)
  return titled(out, title) if title else out


def _nice_step(span: float, target: int) -> float:
  raw = span / max(1, target)
  magnitude = 10 ** math.floor(math.log10(raw))
  return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
  if hi <= lo:
    hi = lo + (abs(lo) or 1.0)
  step = _nice_step(hi - lo, target)
  first = math.floor(lo / step) * step
  count = math.ceil((hi - first) / step - 1e-9)
  return [first + i * step for i in range(count + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
  return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def format_number(value: float) -> str:
  """Short tick/value label: 0.25, 1e-05, 12000, 3.5e+06."""
  if value == 0:
    return "0"
  if 1e-3 <= abs(value) < 1e5:
    return f"{value:.6g}"  # nice tick values print exactly; float noise (0.30000000000000004) does not
  return f"{value:.0e}" if math.log10(abs(value)).is_integer() else f"{value:.2g}"


class _Axis:
  """Maps data values onto a pixel range, linearly or by log10."""

  def __init__(self, ticks: Sequence[float], start: int, end: int, log: bool):
    self.ticks, self.start, self.end, self.log = list(ticks), start, end, log
    self.lo, self.hi = self._t(self.ticks[0]), self._t(self.ticks[-1])

  def _t(self, v: float) -> float:
    return math.log10(v) if self.log else v

  def __call__(self, v: float) -> float:
    return self.start + (self._t(v) - self.lo) / (self.hi - self.lo) * (self.end - self.start)


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str, *, log: bool = False,
              colors: Sequence[Sequence[int]] | None = None, value_label: str = "",
              value_format=format_number, width: int = 900) -> Image.Image:
  """Horizontal bars, one per label, with the value printed at each bar's end.

  `log=True` uses a log10 axis (for distributions such as iSAID's, where background is
  >97% of pixels and small vehicles ~0.3%); zero values then draw no bar. `colors` gives
  each bar its own colour (e.g. the class palette).
  """
  values = [float(v) for v in values]
  if len(values) != len(labels) or not values:
    raise ValueError(f"bar_chart needs one value per label, got {len(values)} values and {len(labels)} labels")
  fills = [tuple(int(c) for c in rgb) for rgb in colors] if colors is not None else [SERIES_COLORS[0]] * len(values)
  return _bars([[(v, fill)] for v, fill in zip(values, fills)], labels, title, {}, log=log,
               value_label=value_label, value_format=value_format, width=width)


def grouped_bar_chart(series: Mapping[str, Sequence[float]], labels: Sequence[str], title: str, *,
                      log: bool = False, value_label: str = "", value_format=format_number,
                      width: int = 900) -> Image.Image:
  """Per label, one horizontal bar per named series (e.g. real vs synthetic class shares), with a legend."""
  columns = {name: [float(v) for v in values] for name, values in series.items()}
  if not columns or any(len(values) != len(labels) for values in columns.values()) or not labels:
    raise ValueError(f"grouped_bar_chart needs one value per label in every series; {len(labels)} labels, "
                     f"series lengths {({name: len(v) for name, v in columns.items()})}")
  colours = {name: SERIES_COLORS[i % len(SERIES_COLORS)] for i, name in enumerate(columns)}
  groups = [[(values[i], colours[name]) for name, values in columns.items()] for i in range(len(labels))]
  return _bars(groups, labels, title, colours, log=log, value_label=value_label, value_format=value_format,
               width=width)


def _bars(groups: Sequence[Sequence[tuple[float, RGB]]], labels: Sequence[str], title: str,
          legend_colours: Mapping[str, RGB], *, log: bool, value_label: str, value_format, width: int) -> Image.Image:
  """Horizontal bar chart: one row per label holding that group's (value, colour) bars."""
  size, bar_h = 14, 16
  values = [v for group in groups for v, _ in group]
  positive = [v for v in values if v > 0]
  if log and positive:
    # Start the axis below the smallest value, so even that bar has visible length.
    ticks = _log_ticks(min(positive) / 3, max(positive))
  else:
    log = False
    ticks = _linear_ticks(min(0.0, *values), max(0.0, *values))
  row_h = bar_h * max(len(g) for g in groups) + 8
  label_w = max(_text_size(label, size)[0] for label in labels) + 16
  value_w = max(_text_size(value_format(v), size)[0] for v in values) + 12
  title_h = 36 + (20 if legend_colours else 0)
  bottom = title_h + row_h * len(groups)
  left, right = label_w, width - value_w
  axis = _Axis(ticks, left, right, log)
  chart = Image.new("RGB", (width, bottom + 44), WHITE)
  draw = ImageDraw.Draw(chart)
  draw.text((8, 18), title, fill=INK, font=font(18), anchor="lm")
  x = left
  for name, colour in legend_colours.items():
    draw.rectangle((x, 40, x + 13, 53), fill=colour, outline=INK)
    draw.text((x + 19, 47), name, fill=INK, font=font(13), anchor="lm")
    x += 19 + _text_size(name, 13)[0] + 18
  for tick in ticks:
    x = axis(tick)
    draw.line((x, title_h, x, bottom), fill=GRID)
    draw.line((x, bottom, x, bottom + 4), fill=INK)
    draw.text((x, bottom + 6), value_format(tick), fill=INK, font=font(12), anchor="mt")
  draw.line((left, bottom, right, bottom), fill=INK)
  if value_label:
    draw.text(((left + right) / 2, bottom + 26), value_label + (" (log scale)" if log else ""),
              fill=INK, font=font(12), anchor="mt")
  base = axis(ticks[0]) if log else axis(0.0)
  for i, (group, label) in enumerate(zip(groups, labels)):
    row_top = title_h + i * row_h + 4
    draw.text((left - 8, row_top + len(group) * bar_h / 2), label, fill=INK, font=font(size), anchor="rm")
    for j, (value, fill) in enumerate(group):
      top = row_top + j * bar_h
      end = axis(value) if (value > 0 or not log) else base  # log axes cannot show 0: no bar
      if end != base:
        draw.rectangle((min(base, end), top, max(base, end), top + bar_h - 2), fill=fill, outline=INK)
      draw.text((max(base, end) + 6, top + bar_h / 2 - 1), value_format(value), fill=INK, font=font(size - 2),
                anchor="lm")
  draw.line((left, title_h, left, bottom), fill=INK)
  return chart


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, *,
               x_label: str = "", y_label: str = "", log_y: bool = False,
               width: int = 900, height: int = 500) -> Image.Image:
  """One line per named (x, y) series with axes, grid and legend; non-finite points break a line."""
  cleaned = {}
  for name, (xs, ys) in series.items():
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape:
      raise ValueError(f"series {name!r}: x has {x.size} points but y has {y.size}")
    cleaned[name] = (x, y, np.isfinite(x) & np.isfinite(y) & ((y > 0) if log_y else True))
  shown = [(x[ok], y[ok]) for x, y, ok in cleaned.values() if ok.any()]
  if not shown:
    raise ValueError(f"line_chart {title!r}: no finite points to draw")
  all_x = np.concatenate([x for x, _ in shown])
  all_y = np.concatenate([y for _, y in shown])
  x_ticks = _linear_ticks(all_x.min(), all_x.max())
  y_ticks = _log_ticks(all_y.min(), all_y.max()) if log_y else _linear_ticks(all_y.min(), all_y.max())
  y_tick_w = max(_text_size(format_number(t), 12)[0] for t in y_ticks)
  left, right, top, bottom = y_tick_w + (34 if y_label else 16), width - 16, 40, height - 48
  x_axis, y_axis = _Axis(x_ticks, left, right, False), _Axis(y_ticks, bottom, top, log_y)
  chart = Image.new("RGB", (width, height), WHITE)
  draw = ImageDraw.Draw(chart)
  draw.text((8, 20), title, fill=INK, font=font(18), anchor="lm")
  for t in x_ticks:
    draw.line((x_axis(t), top, x_axis(t), bottom), fill=GRID)
    draw.text((x_axis(t), bottom + 6), format_number(t), fill=INK, font=font(12), anchor="mt")
  for t in y_ticks:
    draw.line((left, y_axis(t), right, y_axis(t)), fill=GRID)
    draw.text((left - 6, y_axis(t)), format_number(t), fill=INK, font=font(12), anchor="rm")
  draw.rectangle((left, top, right, bottom), outline=INK)
  if x_label:
    draw.text(((left + right) / 2, bottom + 26), x_label, fill=INK, font=font(13), anchor="mt")
  if y_label:
    label = Image.new("RGB", (_text_size(y_label, 13)[0] + 4, 18), WHITE)
    ImageDraw.Draw(label).text((2, 9), y_label, fill=INK, font=font(13), anchor="lm")
    rotated = label.rotate(90, expand=True)
    chart.paste(rotated, (4, int((top + bottom - rotated.height) / 2)))
  for i, (x, y, ok) in enumerate(cleaned.values()):
    color = SERIES_COLORS[i % len(SERIES_COLORS)]
    points = [(x_axis(a), y_axis(b)) if good else None for a, b, good in zip(x, y, ok)]
    run: list[tuple[float, float]] = []
    for point in points + [None]:
      if point is not None:
        run.append(point)
        continue
      if len(run) == 1:
        draw.ellipse((run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2), fill=color)
      elif run:
        draw.line(run, fill=color, width=2, joint="curve")
      run = []
  # Legend last, on a white box, so no curve hides it; in the corner the curves' points crowd least
  # (a training curve's top right is where it ends, the part people read).
  text_w = min(max(_text_size(name, 12)[0] for name in cleaned), (right - left) // 2)
  box_w, box_h = text_w + 40, 8 + 18 * len(cleaned)
  drawn = []  # points along every drawn segment, not only its ends
  for x, y, ok in cleaned.values():
    pixels = [(x_axis(a), y_axis(b)) if good else None for a, b, good in zip(x, y, ok)]
    for p, q in zip(pixels, pixels[1:] + [None]):
      if p is not None:
        drawn += [p] if q is None else [(p[0] + f * (q[0] - p[0]), p[1] + f * (q[1] - p[1]))
                                        for f in np.linspace(0, 1, 16)]
  corners = [(right - 6 - box_w, top + 6), (right - 6 - box_w, bottom - 6 - box_h), (left + 6, top + 6),
             (left + 6, bottom - 6 - box_h)]

  def crowd(corner):
    bx, by = corner
    return sum(bx - 8 <= px <= bx + box_w + 8 and by - 8 <= py <= by + box_h + 8 for px, py in drawn)

  box_left, box_top = min(corners, key=crowd)  # ties keep the first: top right
  draw.rectangle((box_left, box_top, box_left + box_w, box_top + box_h), fill=WHITE, outline=GRID)
  for i, name in enumerate(cleaned):
    legend_y = box_top + 13 + i * 18
    draw.line((box_left + 8, legend_y, box_left + 30, legend_y), fill=SERIES_COLORS[i % len(SERIES_COLORS)], width=3)
    draw.text((box_left + 36, legend_y), _clip_text(name, text_w, 12), fill=INK, font=font(12), anchor="lm")
  return chart


def save_png(picture: Array | Image.Image, path: str | os.PathLike) -> pathlib.Path:
  """Write a PNG atomically (temp file in the same folder, fsync, rename); returns the path.

  Arrays keep their layout: [H, W] uint8/uint16 becomes a one-channel (index) PNG.
  """
  picture = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
  return atomic.write(path, lambda file: picture.save(file, format="PNG"))
