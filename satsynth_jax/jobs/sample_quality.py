"""`--mode=evaluate_samples`: sample quality as the paper scores it, plus label fidelity.

The encoder (sample_quality.encoder) is a segmenter trained on the real train split only: the
paper's ResNet-50 U-Net (models/unet_seg.py, `--mode=train_metric_encoder`, its own run
`checkpoints/metric_encoder/`), or the experiment's R=0 segmenter of seed `seed` (`real_only`).
Its backbone features replace Inception (metrics/fid.py):

  FID, sFID  synthetic images against the real *train* split, the distribution the generator
             was trained to reproduce (as DDPM papers score against their training set).
  IS         of the synthetic images, from the encoder's per-image class distributions.
  label fidelity (not in the paper)  the encoder segments the synthetic images and its
             predictions are scored against the synthetic masks (mIoU, per-class IoU): high
             when the generated masks describe the generated images. Undefined (null) for
             a set without labelled pixels, e.g. an image-only baseline's all-ignore masks.
  class shares (not in the paper)  "class_frequency": each class's share of the labelled
             pixels in the real train split and in the set, and "class_tv", their total
             variation distance (0: the same shares); drawn in report/class_frequency_<set>.png.
  presence accuracy (conditioned sets)  of the pairs asked for class c (the set's saved
             requests, presence.py), the fraction whose decoded mask holds c.

Every image is viewed as the segmenter sees it: at its input size (resolved.segmenter_size), through
the eval pipeline (resized or centre-cropped as `data.resize` says), so 256 px super-resolved
samples are scored at the same size as the real patches.

Scores depend on the encoder's weights, so every JSON names them, "<encoder run>@<step>:<sha256 of
the weights>" (e.g. "metric_encoder@1000:..."): compare numbers only when that id matches.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from satsynth_jax import labels, presence, resolved, segmenter
from satsynth_jax.data import pipeline, records
from satsynth_jax.infra import atomic, checkpoint, parallel, report, viz, workdir as layout
from satsynth_jax.infra.errors import SatSynthError
from satsynth_jax.metrics import fid, segmentation as seg_metrics, synthetic as synthetic_metrics

IS_SPLITS = 10  # the usual protocol (10 parts of 5000 images)...
IS_MIN_SPLIT_SIZE = 100  # ...but fewer parts for small sets: each part's marginal p(y) needs images

Extractor = Callable[[dict, jax.Array], dict[str, jax.Array]]


class TooFewImagesError(SatSynthError, ValueError):
  """A record folder holds fewer than the 2 images a covariance needs; the message names it."""


def make_extractor(model: nn.Module, mesh) -> Extractor:
  """fid.extract_features of `model` jitted once (and shared by every set an experiment scores): replicated
  weights, images sharded on the batch axis."""
  return parallel.shared_jit(functools.partial(_features, model=model),
                             in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                             out_shardings=parallel.batch_sharding(mesh))


def _features(variables, images, *, model: nn.Module):
  # Over the module, not its bound `apply`: bound methods compare by identity, modules by their fields.
  return fid.extract_features(model.apply, variables, images)


def accumulate_features(config, extract: Extractor, variables, record_dir: str, mesh) -> fid.FeatureAccumulator:
  """Encoder features of every image of `record_dir`, one ordered pass; the padding rows are dropped."""
  batch_size = parallel.per_process_batch_size(config.segmentation.eval_batch_size,
                                               "segmentation.eval_batch_size", mesh)
  batches = pipeline.segmentation_batches(config, record_dir, batch_size=batch_size, seed=config.seed, train=False)
  accumulator, pending = fid.FeatureAccumulator(), None
  with jax.set_mesh(mesh):
    for batch in batches:
      batch = parallel.to_global({"image": batch["image"], "valid": batch["valid"]}, mesh)
      current = (extract(variables, batch["image"]), batch["valid"])
      if pending is not None:  # fetch one batch behind, so the device never waits for the host
        accumulator.update(*parallel.to_host(pending))
      pending = current
  accumulator.update(*parallel.to_host(pending))
  return accumulator


def inception_score(features: fid.FeatureAccumulator) -> dict[str, float]:
  """{"mean", "std", "splits"} of IS over up to IS_SPLITS parts of at least IS_MIN_SPLIT_SIZE images.

  A set smaller than 2 x IS_MIN_SPLIT_SIZE is scored whole: splits 1, std 0.
  """
  splits = min(IS_SPLITS, max(1, features.count // IS_MIN_SPLIT_SIZE))
  mean, std = fid.inception_score(features.probs(), splits)
  return {"mean": mean, "std": std, "splits": splits}


def distances(real: fid.FeatureAccumulator, other: fid.FeatureAccumulator) -> dict[str, float]:
  """{"fid", "sfid"} of `other` against `real`: Fréchet distances of the pooled and spatial features."""
  return {key: fid.frechet_distance(*real.statistics(name), *other.statistics(name))
          for key, name in (("fid", "pooled"), ("sfid", "spatial"))}


def _scorable_manifest(record_dir: str) -> dict:
  """The folder's verified manifest, after checking it holds the 2 images a covariance needs."""
  manifest = records.read_manifest(record_dir)
  if manifest["num_examples"] < 2:
    raise TooFewImagesError(f"FID and sFID need at least 2 images; {record_dir} holds {manifest['num_examples']}")
  return manifest


def label_statistics(config, train_manifest: dict, synthetic_dir) -> dict:
  """class_frequency (real train vs set), class_tv (None for a set without labels, e.g. the image-only
  baseline's) and, for a set drawn from presence requests, presence_accuracy."""
  names = list(config.data.class_names)
  pixels = records.read_manifest(synthetic_dir)["class_pixels"]
  real, synthetic = (synthetic_metrics.class_shares(p) for p in (train_manifest["class_pixels"], pixels))
  out = {"class_frequency": {"real": dict(zip(names, real.tolist())), "synthetic": dict(zip(names, synthetic.tolist()))},
         "class_tv": synthetic_metrics.total_variation(real, synthetic) if any(pixels) else None,
         "presence_accuracy": None}
  requests_path = pathlib.Path(synthetic_dir) / presence.REQUESTS_FILE
  if requests_path.exists():
    requested = np.load(requests_path)
    source = records.PairSource(synthetic_dir)
    try:
      produced = np.stack([labels.presence(source[i]["mask"], len(names)) for i in range(len(source))])
    finally:
      source.close()
    accuracy = synthetic_metrics.presence_accuracy(requested[:len(produced)], produced)
    out["presence_accuracy"] = report.json_safe({name: float(v) for name, v in zip(names, accuracy)})
  return out


def label_chart(config, statistics: dict, title: str):
  """Real vs synthetic class shares (log scale) and, when requested, the presence accuracy per class."""
  names = list(config.data.class_names)
  shares = {kind: [statistics["class_frequency"][kind][n] for n in names] for kind in ("real", "synthetic")}
  chart = viz.grouped_bar_chart(shares, names, title=f"{title}: class share of labelled pixels "
                                f"(total variation {statistics['class_tv']:.3f})", log=True)
  accuracy = statistics["presence_accuracy"]
  if accuracy is None:
    return chart
  values = [accuracy[n] for n in names]
  bars = viz.bar_chart([0.0 if v is None else v for v in values],
                       [f"{n} (not asked)" if v is None else n for n, v in zip(names, values)],
                       f"{title}: presence accuracy (pairs asked for the class whose mask holds it)",
                       colors=config.data.palette, value_label="fraction", value_format=lambda v: f"{v:.2f}",
                       width=chart.width)
  return viz.stack([chart, bars])


def is_complete(config, workdir, synthetic_dir, name: str) -> bool:
  """A sample-quality JSON exists for the finished set `synthetic_dir`, under the encoder's current checkpoint."""
  path = layout.metrics_path(workdir, output_name(name))
  if not path.exists():
    return False
  with open(path, encoding="utf-8") as f:
    scores = json.load(f)
  encoder = resolved.sample_encoder(config).name
  encoder_step = checkpoint.latest_step(layout.checkpoint_dir(workdir, encoder))
  return (scores["num_synthetic"] == records.read_manifest(synthetic_dir)["num_examples"]
          and scores["metric_encoder"].startswith(f"{encoder}@{encoder_step}:")
          and "class_tv" in scores)


def output_name(name: str) -> str:
  """"sample_quality_<set>" (metrics/ and report/ file stem), "sample_quality" for an unnamed set."""
  if not re.fullmatch(r"[A-Za-z0-9_.-]*", name):
    raise ValueError(f"sample set name {name!r} must be letters, digits, '_', '.' or '-' (it names files)")
  return f"sample_quality_{name}" if name else "sample_quality"


def run_for(config, workdir: str, synthetic_dir: str, name: str = "") -> dict:
  """Scores the synthetic records in `synthetic_dir`; writes metrics/<output_name(name)>.json and returns it.

  Also writes report/<output_name(name)>.png (synthetic pairs beside the encoder's
  predictions, and the per-class label fidelity IoU) when the set has labels.
  """
  d = config.data
  stem = output_name(name)
  train_dir = layout.data_dir(workdir, "train")
  _scorable_manifest(train_dir)
  # The manifest counts each class's pixels: none means masks without labels (all no-data).
  has_labels = any(_scorable_manifest(synthetic_dir)["class_pixels"])
  mesh = parallel.make_mesh()
  run = resolved.sample_encoder(config)
  model, variables, step = segmenter.restore(config, workdir, run, mesh)
  encoder = checkpoint.weights_id(run.name, variables, step)
  extract = make_extractor(model, mesh)

  real, synthetic = (accumulate_features(config, extract, variables, record_dir, mesh)
                     for record_dir in (train_dir, synthetic_dir))
  fidelity, result = None, None
  if has_labels:
    result = segmenter.evaluate_split(config, model, variables, synthetic_dir, mesh)
    fidelity = seg_metrics.segmentation_scores(result.confusion, d.class_names)
  summary = {
      **label_statistics(config, records.read_manifest(train_dir), synthetic_dir),
      "metric_encoder": encoder, "image_size": resolved.segmenter_size(config),
      "real_dir": str(train_dir), "synthetic_dir": str(synthetic_dir), "num_real": real.count, "num_synthetic": synthetic.count,
      **distances(real, synthetic), "is": inception_score(synthetic), "set": pathlib.Path(synthetic_dir).name,
      "label_fidelity_miou": None, "label_fidelity": None,
      "real_is": inception_score(real),  # IS of the real images: its scale for this encoder and dataset
  }
  if fidelity is not None:
    summary["label_fidelity"] = report.json_safe(fidelity)
    summary["label_fidelity_miou"] = summary["label_fidelity"]["miou"]
  if jax.process_index() == 0:
    atomic.write_bytes(layout.metrics_path(workdir, stem),
                       json.dumps(summary, indent=1, allow_nan=False).encode())
    if has_labels:
      viz.save_png(label_chart(config, summary, pathlib.Path(synthetic_dir).name),
                   layout.report_path(workdir, f"class_frequency_{pathlib.Path(synthetic_dir).name}.png"))
    headline = (f"{stem}: FID {summary['fid']:.4g}, sFID {summary['sfid']:.4g}, IS {summary['is']['mean']:.3f} "
                f"over {synthetic.count} synthetic vs {real.count} real images ({encoder})")
    if fidelity is not None:
      headline += f"; label fidelity mIoU {fidelity['miou']:.3f}"
      title = (f"{stem}: label fidelity of {synthetic.count} synthetic pairs (FID {summary['fid']:.4g}) "
               f"under {encoder}")
      viz.save_png(report.report_picture(config, result.preview, fidelity, title),
                   layout.report_path(workdir, f"{stem}.png"))
    print(headline, flush=True)
  return summary


def run(config, workdir) -> dict:
  """--mode=evaluate_samples: score data.synthetic_dir (default: this config's sampled set) into
  metrics/sample_quality_<set>.json."""
  directory = resolved.synthetic_dir(config, workdir)
  return run_for(config, workdir, directory, pathlib.Path(directory).name)
