"""Scene reading shared by every converter: Scene/Inventory, image and mask readers, class mapping.

Converters list a download as an Inventory of Scenes (file pairs, nothing read);
`load_scene` then reads one scene with the checks every dataset needs: sizes match,
classes in range, and no image larger than the pixel limit. The limit is checked from each
file's header before its pixels are decoded (PNG/JPEG/BMP through Pillow, TIFF through
tifffile), so a file declaring 100000 x 100000 px is refused without allocating 28 GiB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import threading
from collections.abc import Sequence

import ml_collections
import numpy as np
import tifffile
from PIL import Image

from satsynth_jax.infra.errors import SatSynthError

SPLITS = ("train", "val")  # a download's labelled splits; data/splits.py gives them their roles
TEST = "test"  # a labelled test split, which a folder download may have
TIFF_SUFFIXES = (".tif", ".tiff")

# iSAID keeps DOTA's whole scenes, up to ~20000 x 20000 px (4e8 pixels). Pillow's default
# limit (~0.9e8) would refuse them, so raise it to just above the largest real scene rather
# than disabling the guard; config.data.max_image_pixels raises it further.
Image.MAX_IMAGE_PIXELS = 5 * 10**8
# Held while Pillow's own guard is lifted to parse a header (see _open_pillow).
_PILLOW_GUARD = threading.Lock()


# rgb_to_classes decodes in row blocks of about this many pixels, which bounds its
# uint32/int64 temporaries for huge iSAID scenes (~50 MB instead of several GB).
RGB_BLOCK_PIXELS = 4_000_000


class SourceError(SatSynthError, ValueError):
  """A download that cannot be converted; the message names the file and the offending value."""


@dataclasses.dataclass(frozen=True)
class Scene:
  """One image/mask file pair of a download."""

  split: str  # "train", "val" or "test"
  scene_id: str  # unique within the dataset; patch ids extend it
  image_path: pathlib.Path
  mask_path: pathlib.Path
  mask_format: str  # "index": class numbers; "rgb": colours from data.palette


@dataclasses.dataclass(frozen=True)
class Inventory:
  """The scenes found and, in words, what the expected layout lacked."""

  scenes: tuple[Scene, ...]
  missing: tuple[str, ...] = ()


def require_dir(source_dir: pathlib.Path, layout: str) -> pathlib.Path:
  source_dir = pathlib.Path(source_dir)
  if not str(source_dir) or not source_dir.is_dir():
    raise SourceError(f"config.data.source_dir={str(source_dir)!r} is not a directory; expected {layout}")
  return source_dir


def pair_by_stem(images: Sequence[pathlib.Path], masks: Sequence[pathlib.Path]):
  """Match images to masks by file stem -> (pairs, unmatched image names, unmatched mask names)."""
  masks_by_stem = {m.stem: m for m in masks}
  images_by_stem = {i.stem: i for i in images}
  pairs = [(images_by_stem[s], masks_by_stem[s]) for s in sorted(images_by_stem) if s in masks_by_stem]
  lone_images = sorted(i.name for s, i in images_by_stem.items() if s not in masks_by_stem)
  lone_masks = sorted(m.name for s, m in masks_by_stem.items() if s not in images_by_stem)
  return pairs, lone_images, lone_masks


def describe_names(names: Sequence[str], limit: int = 3) -> str:
  """'a.png, b.png, c.png and 4 more': short enough for one log line."""
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def pixel_limit(max_image_pixels: int = 0) -> int | None:
  """The most pixels an image may have: max_image_pixels, or when 0 Pillow's Image.MAX_IMAGE_PIXELS (None: no limit)."""
  if max_image_pixels:
    return int(max_image_pixels)
  with _PILLOW_GUARD:
    return Image.MAX_IMAGE_PIXELS


def _check_pixels(path: pathlib.Path, width: int, height: int, limit: int | None) -> None:
  if limit is not None and width * height > limit:
    raise SourceError(
        f"{path}: header declares {width}x{height} px ({width * height} pixels), over the limit of {limit} "
        f"pixels that guards against decompression bombs; if the image is genuine, set "
        f"config.data.max_image_pixels to at least {width * height}")


def _open_pillow(path: pathlib.Path, limit: int | None) -> Image.Image:
  """Image.open (header only) checked against `limit` instead of Pillow's own guard.

  Pillow refuses images over 2 * MAX_IMAGE_PIXELS inside Image.open, before we see the
  size, so its guard is lifted while the header is parsed: one limit, one message, for
  every format. The lock keeps concurrent readers here from restoring a lifted value.
  """
  with _PILLOW_GUARD:
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
      image = Image.open(path)
    finally:
      Image.MAX_IMAGE_PIXELS = pillow_limit
  try:
    _check_pixels(path, *image.size, limit)
  except SourceError:
    image.close()
    raise
  return image


@contextlib.contextmanager
def _readable(path: pathlib.Path):
  """Turns the readers' errors for an unreadable file into a SourceError naming it."""
  try:
    yield
  except SourceError:
    raise
  except (OSError, ValueError, Image.DecompressionBombError) as e:  # tifffile's errors are ValueErrors
    raise SourceError(f"{path}: cannot read ({e})") from e


def _checked_tiff_size(tiff: tifffile.TiffFile, path: pathlib.Path, limit: int) -> tuple[int, int]:
  """(height, width) of a TIFF's first page from its header, refused over the pixel limit."""
  page = tiff.pages.first
  _check_pixels(path, page.imagewidth, page.imagelength, limit)
  return page.imagelength, page.imagewidth


def image_size(path: pathlib.Path, max_pixels: int = 0) -> tuple[int, int]:
  """(height, width) from the file's header, without decoding; images over the pixel limit are refused."""
  limit = pixel_limit(max_pixels)
  with _readable(path):
    if path.suffix.lower() in TIFF_SUFFIXES:
      with tifffile.TiffFile(path) as tiff:
        return _checked_tiff_size(tiff, path, limit)
    with _open_pillow(path, limit) as image:
      return image.height, image.width


def _read_array(path: pathlib.Path, max_pixels: int, palette_to_rgb: bool) -> tuple[np.ndarray, str | None]:
  """Pixels of a PNG/JPEG/TIFF as stored (palette images as RGB if asked), plus the PIL mode (None for TIFF).

  The pixel count is checked from the header before anything is decoded.
  """
  limit = pixel_limit(max_pixels)
  with _readable(path):
    if path.suffix.lower() in TIFF_SUFFIXES:
      with tifffile.TiffFile(path) as tiff:
        _checked_tiff_size(tiff, path, limit)
        array = tiff.asarray()
      # Band-sequential GeoTIFFs come back as [bands, H, W].
      if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
      return array, None
    with _open_pillow(path, limit) as image:
      if palette_to_rgb and image.mode == "P":  # the array would hold palette indices
        return np.asarray(image.convert("RGB")), image.mode
      return np.asarray(image), image.mode


def read_image(path: pathlib.Path, max_pixels: int = 0) -> np.ndarray:
  """uint8 [H, W, 3] RGB; grey or alpha images are brought to RGB, other depths refused.

  max_pixels: the pixel limit (config.data.max_image_pixels); 0 for Pillow's.
  """
  array, mode = _read_array(path, max_pixels, palette_to_rgb=True)
  if array.dtype != np.uint8:
    raise SourceError(f"{path}: image has dtype {array.dtype} (PIL mode {mode}); expected 8-bit RGB")
  if array.ndim == 2:
    return np.repeat(array[:, :, None], 3, axis=2)
  if array.ndim == 3 and array.shape[2] in (3, 4):
    return np.ascontiguousarray(array[:, :, :3])  # drop alpha
  raise SourceError(f"{path}: image has shape {array.shape}; expected H x W x 3")


def read_index_mask(path: pathlib.Path, max_pixels: int = 0) -> np.ndarray:
  """Raw single-channel label values [H, W] (any unsigned int dtype)."""
  array, mode = _read_array(path, max_pixels, palette_to_rgb=False)
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
    raise SourceError(
        f"{path}: index mask has shape {array.shape}, dtype {array.dtype} (PIL mode {mode}); expected "
        "one integer channel (colour-coded masks need config.data.mask_format='rgb')")
  return array


def read_rgb_mask(path: pathlib.Path, max_pixels: int = 0) -> np.ndarray:
  """Colour-coded mask as uint8 [H, W, 3]."""
  array, _ = _read_array(path, max_pixels, palette_to_rgb=True)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4):
    raise SourceError(f"{path}: RGB mask has shape {array.shape}, dtype {array.dtype}; expected H x W x 3 uint8")
  return array[:, :, :3]


def _most_common(names: Sequence[str], counts: np.ndarray, limit: int = 6) -> str:
  """'a: 40 px, b: 3 px and 9 more': the most frequent offenders first, bounded length."""
  order = np.argsort(-counts, kind="stable")
  shown = ", ".join(f"{names[i]}: {counts[i]} px" for i in order[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def mask_dtype(num_classes: int, ignore_index: int) -> np.dtype:
  """uint8 when every class and the ignore index fit, else uint16 (the record format's two options)."""
  return np.dtype(np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.uint16)


def index_to_classes(raw: np.ndarray, *, label_offset: int, ignore_raw_values: Sequence[int],
                     num_classes: int, ignore_index: int, path: pathlib.Path) -> np.ndarray:
  """Raw labels -> classes: add label_offset; ignore_raw_values, and values landing on ignore_index, are no-data."""
  mapped = raw.astype(np.int64) + label_offset
  no_data = np.isin(raw, np.asarray(ignore_raw_values, dtype=np.int64)) | (mapped == ignore_index)
  bad = ~no_data & ((mapped < 0) | (mapped >= num_classes))
  if bad.any():
    values, counts = np.unique(raw[bad], return_counts=True)
    listing = _most_common([str(v) for v in values.tolist()], counts)
    raise SourceError(
        f"{path}: raw mask values outside classes 0..{num_classes - 1} after label_offset={label_offset} "
        f"and not in ignore_raw_values={tuple(ignore_raw_values)}: {listing}")
  mapped[no_data] = ignore_index
  return mapped.astype(mask_dtype(num_classes, ignore_index))


def _rgb_keys(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.uint32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def rgb_to_classes(rgb: np.ndarray, *, palette: Sequence[Sequence[int]], ignore_index: int,
                   path: pathlib.Path) -> np.ndarray:
  """Colour-coded mask -> class k where the pixel equals palette[k]; any other colour is an error."""
  palette_keys = _rgb_keys(np.asarray(palette, dtype=np.uint8))
  order = np.argsort(palette_keys)
  sorted_keys = palette_keys[order]
  classes = np.empty(rgb.shape[:2], dtype=mask_dtype(len(palette), ignore_index))
  unknown = []
  rows = max(1, RGB_BLOCK_PIXELS // max(1, rgb.shape[1]))
  for top in range(0, rgb.shape[0], rows):
    keys = _rgb_keys(rgb[top:top + rows])
    slot = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    known = sorted_keys[slot] == keys
    if not known.all():
      unknown.append(keys[~known])
    classes[top:top + rows] = order[slot]
  if unknown:
    keys, counts = np.unique(np.concatenate(unknown), return_counts=True)
    listing = _most_common([f"({k >> 16}, {(k >> 8) & 255}, {k & 255})" for k in keys.tolist()], counts)
    raise SourceError(f"{path}: {len(keys)} colour(s) not in config.data.palette: {listing}")
  return classes


def scene_size(scene: Scene, data: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) of a scene from its image's header (nothing decoded); `data` is config.data."""
  return image_size(scene.image_path, data.get("max_image_pixels", 0))


def load_scene(scene: Scene, data: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 image [H, W, 3], class mask [H, W]) of a scene; `data` is config.data."""
  max_pixels = data.get("max_image_pixels", 0)
  image = read_image(scene.image_path, max_pixels)
  if scene.mask_format == "rgb":
    raw = read_rgb_mask(scene.mask_path, max_pixels)
  else:
    raw = read_index_mask(scene.mask_path, max_pixels)
  if image.shape[:2] != raw.shape[:2]:
    raise SourceError(
        f"size mismatch: image {scene.image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but "
        f"mask {scene.mask_path} is {raw.shape[1]}x{raw.shape[0]}")
  if scene.mask_format == "rgb":
    mask = rgb_to_classes(raw, palette=data.palette, ignore_index=data.ignore_index, path=scene.mask_path)
  else:
    mask = index_to_classes(raw, label_offset=data.label_offset, ignore_raw_values=data.ignore_raw_values,
                            num_classes=data.num_classes, ignore_index=data.ignore_index, path=scene.mask_path)
  return image, mask
