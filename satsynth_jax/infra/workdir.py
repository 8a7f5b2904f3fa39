"""Every path under `--workdir`, defined once; no other module joins workdir paths.

```
<workdir>/
  data/<split>/            prepared real records (train, val, test)
  demo_source/             the demo's procedural scenes (before prepare converts them)
  checkpoints/<run>/       one orbax run per trained model, with its config.json
  synthetic/<set>/         sampled (and curated) record sets, with their config.json
  samples/                 PNG grids of generated pairs
  metrics/                 JSON-lines logs, TensorBoard events, eval and score JSONs
  report/                  summary.md and the report PNGs
  export/<set>/            PNG folders for other tools
  locks/                   one lock file per running job kind
```
"""

from __future__ import annotations

import os
import pathlib

from satsynth_jax.infra.errors import SatSynthError

# train: what G and the segmenters learn from; val: where settings are chosen (curves, levers);
# test: scenes no setting is ever chosen on, where the experiment's claims are made.
SPLITS = ("train", "val", "test")
HELD_OUT = ("test", "val")  # the splits a segmenter run is scored on, the claim's first


class WorkdirError(SatSynthError, ValueError):
  """A --workdir this project cannot write to; the message says what to use instead."""


def resolve(workdir: str | os.PathLike) -> pathlib.Path:
  """The absolute local workdir; bucket URLs are refused (writes are atomic renames on a filesystem)."""
  text = os.fspath(workdir)
  if not text:
    raise WorkdirError("--workdir is empty: every output of the run goes under it")
  if "://" in text:
    raise WorkdirError(
        f"--workdir={text}: bucket URLs are not supported (checkpoints, shards and manifests are written "
        f"by atomic rename); mount the bucket as a filesystem (e.g. gcsfuse) and pass the mount point")
  return pathlib.Path(text).expanduser().absolute()


def data_dir(workdir, split: str) -> pathlib.Path:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  return resolve(workdir) / "data" / split


def demo_source_dir(workdir) -> pathlib.Path:
  return resolve(workdir) / "demo_source"


def checkpoint_dir(workdir, run: str) -> pathlib.Path:
  return resolve(workdir) / "checkpoints" / _name(run)


def synthetic_dir(workdir, name: str) -> pathlib.Path:
  return resolve(workdir) / "synthetic" / _name(name)


def metrics_dir(workdir) -> pathlib.Path:
  return resolve(workdir) / "metrics"


def metrics_path(workdir, name: str, suffix: str = ".json") -> pathlib.Path:
  return metrics_dir(workdir) / f"{_name(name)}{suffix}"


def report_path(workdir, filename: str) -> pathlib.Path:
  return resolve(workdir) / "report" / _name(filename)


def samples_path(workdir, filename: str) -> pathlib.Path:
  return resolve(workdir) / "samples" / _name(filename)


def export_dir(workdir, name: str) -> pathlib.Path:
  return resolve(workdir) / "export" / _name(name)


def lock_path(workdir, job: str) -> pathlib.Path:
  return resolve(workdir) / "locks" / f"{_name(job)}.lock"


def _name(name: str) -> str:
  """One path component: run, set and file names never climb out of the workdir."""
  if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
    raise ValueError(f"{name!r} is not a valid name inside the workdir")
  return name
