"""Report pictures with Pillow only: colour-coded masks, image/mask grids, bar and line charts.

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
  """Scale the longer side to `size` (masks with NEAREST so no colour is invented)."""
  if size is None or max(picture.size) == size:
    return picture
  scale = size / max(picture.size)
  new_size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
  resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
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
    pair = Image.new("RGB", (left.width + right.width + 2, max(left.height, right.height)), WHITE)
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width + 2, 0))
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
    return f"{value:.4g}"
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
  >97% of pixels and small vehicles ~0.3%); zero values then draw no bar.
  """
  values = [float(v) for v in values]
  if len(values) != len(labels) or not values:
    raise ValueError(f"bar_chart needs one value per label, got {len(values)} values and {len(labels)} labels")
  size, row_h = 14, 24
  positive = [v for v in values if v > 0]
  if log and positive:
    ticks = _log_ticks(min(positive), max(positive))
  else:
    log = False
    ticks = _linear_ticks(min(0.0, *values), max(0.0, *values))
  label_w = max(_text_size(label, size)[0] for label in labels) + 16
  value_w = max(_text_size(value_format(v), size)[0] for v in values) + 12
  title_h, axis_h = 36, 44
  height = title_h + row_h * len(values) + axis_h
  left, right = label_w, width - value_w
  axis = _Axis(ticks, left, right, log)
  chart = Image.new("RGB", (width, height), WHITE)
  draw = ImageDraw.Draw(chart)
  draw.text((8, title_h // 2), title, fill=INK, font=font(18), anchor="lm")
  bottom = title_h + row_h * len(values)
  for tick in ticks:
    x = axis(tick)
    draw.line((x, title_h, x, bottom), fill=GRID)
    draw.line((x, bottom, x, bottom + 4), fill=INK)
    draw.text((x, bottom + 6), format_number(tick), fill=INK, font=font(12), anchor="mt")
  draw.line((left, bottom, right, bottom), fill=INK)
  if value_label:
    draw.text(((left + right) / 2, bottom + 26), value_label + (" (log scale)" if log else ""),
              fill=INK, font=font(12), anchor="mt")
  base = axis(ticks[0]) if log else axis(0.0)
  for i, (value, label) in enumerate(zip(values, labels)):
    top = title_h + i * row_h + 4
    middle = top + (row_h - 8) / 2
    draw.text((left - 8, middle), label, fill=INK, font=font(size), anchor="rm")
    if value > 0 or not log:
      end = axis(value)
      fill = tuple(int(c) for c in colors[i]) if colors is not None else SERIES_COLORS[0]
      draw.rectangle((min(base, end), top, max(base, end), top + row_h - 8), fill=fill, outline=INK)
    text_x = axis(value) if (value > 0 or not log) else base
    draw.text((max(base, text_x) + 6, middle), value_format(value), fill=INK, font=font(size), anchor="lm")
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
  for i, (name, (x, y, ok)) in enumerate(cleaned.items()):
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
        draw.line(run, fill=color, width=2)
      run = []
    legend_y = top + 8 + i * 18
    draw.line((right - 150, legend_y, right - 128, legend_y), fill=color, width=3)
    draw.text((right - 122, legend_y), _clip_text(name, 118, 12), fill=INK, font=font(12), anchor="lm")
  return chart


def save_png(picture: Array | Image.Image, path: str | os.PathLike) -> pathlib.Path:
  """Write a PNG atomically (temp file in the same folder, fsync, rename); returns the path.

  Arrays keep their layout: [H, W] uint8/uint16 becomes a one-channel (index) PNG.
  """
  picture = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(temp, "wb") as f:
      picture.save(f, format="PNG")
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  finally:
    temp.unlink(missing_ok=True)
  return path
