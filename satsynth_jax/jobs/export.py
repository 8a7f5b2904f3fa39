"""--mode=export: a prepared, synthetic or curated set as plain PNG folders for other tools.

`<workdir>/export/<set>/` holds, per pair, under the pair's id as file stem:

  images/<id>.png    RGB uint8, the record's PNG byte for byte
  masks/<id>.png     class index per pixel (uint8, or uint16 when num_classes > 255);
                     no-data stays 255 (65535); the record's PNG byte for byte
  previews/<id>.png  the mask coloured with config.data.palette (no-data hatched grey)
  classes.json       names, palette, ignore value, num_classes, mask dtype, and the
                     config.data overrides that read the folder back

This is exactly what `data.format=folder` with `data.mask_format=index` reads (images/ +
masks/ paired by stem; previews/ is ignored), so `--mode=prepare` on an export gives the
same pixels back. Which set: config.export.set = "train" or "val" (prepared records),
the name of a set under <workdir>/synthetic/, or "" (default) for the set this config's
generator samples (data.synthetic_dir when set).

The export is built in a hidden sibling folder and renamed into place when complete, so
a reader sees the old export or the whole new one; an existing export is replaced.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import threading

from absl import logging
from tqdm import tqdm

from satsynth_jax import resolved
from satsynth_jax.data import records, tfrecord
from satsynth_jax.infra import atomic, viz, workdir as layout
from satsynth_jax.infra.errors import SatSynthError

FORMAT = "satsynth_jax.export/v1"
CLASSES = "classes.json"
FOLDERS = ("images", "masks", "previews")


class ExportError(SatSynthError, ValueError):
  """A set that cannot be exported, or an output folder that must not be replaced."""


def _stem(pair_id: str, where: str) -> str:
  """The pair's id as a file stem; ids that are no safe file name are refused, never rewritten."""
  # A leading dot would hide the file from the folder reader's glob; a slash would leave the folder.
  if not pair_id or pair_id.startswith(".") or any(c in pair_id for c in "/\\\0"):
    raise ExportError(f"{where}: pair id {pair_id!r} is not usable as a file name")
  return pair_id


def _pngs(data: bytes) -> tuple[bytes, bytes]:
  """The stored image and mask PNG bytes of a record (already checked by records.parse_pair)."""
  example = tfrecord.Example()
  example.ParseFromString(data)
  feature = example.features.feature
  return feature["image"].bytes_list.value[0], feature["mask"].bytes_list.value[0]


def classes_info(manifest: dict, class_names, palette, source_dir: pathlib.Path) -> dict:
  """classes.json: what the masks' values mean, and how data.format=folder reads the folder back."""
  k = manifest["num_classes"]
  ignore = records.ignore_value(k)
  names, palette = list(class_names), [[int(c) for c in colour] for colour in palette]
  return {
      "format": FORMAT,
      "source": manifest.get("source", ""),
      "num_examples": manifest["num_examples"],
      "num_classes": k,
      "class_names": names,
      "palette": palette,
      "ignore_value": ignore,
      "mask_dtype": "uint8" if k <= 255 else "uint16",
      "read_back": {"data.format": "folder", "data.source_dir": str(source_dir), "data.mask_format": "index",
                    "data.num_classes": k, "data.class_names": names, "data.palette": palette,
                    "data.ignore_index": ignore, "data.label_offset": 0, "data.ignore_raw_values": []},
  }


def _prepare_output(out_dir: pathlib.Path, overwrite: bool) -> pathlib.Path:
  """A fresh hidden staging folder beside out_dir, after checking out_dir may be replaced."""
  if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):  # an empty folder is replaced
    if not (out_dir / CLASSES).is_file():
      raise ExportError(f"{out_dir} exists but holds no {CLASSES}, so it is not an export; move it away "
                        "or export elsewhere")
    if not overwrite:
      raise ExportError(f"{out_dir} already holds an export; delete it or pass overwrite=True")
  staging = out_dir.with_name(f".{out_dir.name}.partial")
  shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted export
  for folder in FOLDERS:
    (staging / folder).mkdir(parents=True)
  return staging


def _replace(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Renames the finished staging folder to out_dir, replacing an earlier export as a whole."""
  old = out_dir.with_name(f".{out_dir.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  if out_dir.exists():
    os.replace(out_dir, old)
  os.replace(staging, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def export_set(record_dir: str | os.PathLike, out_dir: str | os.PathLike, *, palette, class_names=None,
               overwrite: bool = False, threads: int = 4) -> dict:
  """Writes a record directory's pairs as images/, masks/, previews/ and classes.json; returns classes.json.

  class_names default to the set's manifest; palette holds one RGB colour per class.
  """
  manifest = records.read_manifest(record_dir)
  k = manifest["num_classes"]
  class_names = manifest["class_names"] if class_names is None else list(class_names)
  if len(class_names) != k:
    raise ExportError(f"{len(class_names)} class names for the {k} classes of {record_dir}")
  if len(palette) != k or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
    raise ExportError(f"config.data.palette has {len(palette)} colours but {record_dir} has {k} classes; "
                      "give one (r, g, b) in 0..255 per class")
  out_dir = pathlib.Path(out_dir).absolute()
  staging = _prepare_output(out_dir, overwrite)
  ignore = records.ignore_value(k)
  record_dir = records.as_path(record_dir)
  files = [tfrecord.IndexedFile(record_dir / shard["file"]) for shard in manifest["shards"]]
  seen, lock = set(), threading.Lock()

  def export_one(task: tuple[int, int]) -> None:
    shard, index = task
    where = f"{files[shard].path}: record {index}"
    data = files[shard].read(index)
    try:
      pair = records.parse_pair(data)
    except records.RecordError as e:
      raise records.RecordError(f"{where}: {e}") from e
    stem = _stem(pair["id"], where)
    with lock:
      if stem in seen:
        raise ExportError(f"{where}: pair id {stem!r} appears twice in {record_dir}")
      seen.add(stem)
    try:
      preview = viz.colorize(pair["mask"], palette, ignore)
    except ValueError as e:  # classes outside 0..K-1: a record written by another tool
      raise ExportError(f"{where} (id {stem!r}): {e}") from e
    image_png, mask_png = _pngs(data)
    # The stored PNGs are copied as they are: identical pixels, no re-encoding.
    atomic.write_bytes(staging / "images" / f"{stem}.png", image_png)
    atomic.write_bytes(staging / "masks" / f"{stem}.png", mask_png)
    viz.save_png(preview, staging / "previews" / f"{stem}.png")

  tasks = [(shard, index) for shard, file in enumerate(files) for index in range(len(file))]
  pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
  try:
    with tqdm(total=len(tasks), desc="export", unit="pair", dynamic_ncols=True) as bar:
      for _ in pool.map(export_one, tasks):
        bar.update()
    info = classes_info(manifest, class_names, palette, out_dir)
    atomic.write_json(staging / CLASSES, info)
    _replace(staging, out_dir)
  except BaseException:
    pool.shutdown(cancel_futures=True)  # a bad record stops the export without converting the rest
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    pool.shutdown()
    for file in files:
      file.close()
  return info


def resolve_set(config, workdir, name: str):
  """config.export.set -> (the set's record directory, the export's folder name)."""
  if name in layout.SPLITS:
    return layout.data_dir(workdir, name), name
  if not name:
    directory = records.as_path(resolved.synthetic_dir(config, workdir))  # data.synthetic_dir may be a URL
    return directory, directory.name
  try:
    return layout.synthetic_dir(workdir, name), name
  except ValueError as e:
    raise ExportError(f"config.export.set={name!r} is not a set name ('train', 'val' or a folder "
                      f"in {_synthetic_root(workdir)})") from e


def _synthetic_root(workdir) -> pathlib.Path:
  return layout.synthetic_dir(workdir, "_").parent


def _available(workdir) -> list[str]:
  """The finished sets of a workdir (prepared splits, then synthetic sets), for error messages."""
  sets = [split for split in layout.SPLITS if (layout.data_dir(workdir, split) / records.MANIFEST).is_file()]
  parent = _synthetic_root(workdir)
  if parent.is_dir():
    sets += sorted(p.name for p in parent.iterdir() if (p / records.MANIFEST).is_file())
  return sets


def _holds_manifest(record_dir) -> bool:
  """Whether the set's manifest exists; a bucket URL that cannot be read is named in one line."""
  try:
    return (record_dir / records.MANIFEST).is_file()
  except ImportError as e:  # epath reads gs:// through gcsfs (or TensorFlow), an optional extra
    raise ExportError(f"{record_dir}: reading a bucket URL needs gcsfs: pip install 'satsynth_jax[gcs]' "
                      f"({e})") from e
  except Exception as e:  # noqa: BLE001  (bucket backends raise their own types: no access, no network)
    if isinstance(record_dir, pathlib.Path):
      raise
    raise ExportError(f"{record_dir}: cannot read the bucket: {' '.join(str(e).split())[:200]}") from e


def run(config, workdir) -> None:
  """--mode=export: the set config.export.set names -> <workdir>/export/<set>/."""
  export = config.get("export", {})
  name = export.get("set", "")
  record_dir, export_name = resolve_set(config, workdir, name)
  if not _holds_manifest(record_dir):
    available = ", ".join(_available(workdir)) or "none yet (run --mode=prepare or --mode=sample)"
    raise ExportError(f"config.export.set={name!r}: {record_dir} holds no finished set; this workdir has: "
                      f"{available}")
  out_dir = layout.export_dir(workdir, export_name)
  info = export_set(record_dir, out_dir, palette=config.data.palette, overwrite=True,
                    threads=config.data.get("read_threads", 4))
  logging.info("export: %d pairs of %s -> %s", info["num_examples"], record_dir, out_dir)
  print(f"export: {info['num_examples']} pairs of {record_dir} -> {out_dir} (images/, masks/, previews/, "
        f"{CLASSES})", flush=True)
