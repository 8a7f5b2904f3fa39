"""`--mode=curate`: score a pool of sampled pairs, filter their noisy pixels, select R x |D| of them.

The pool is a synthetic record set of at least R x |D| candidates (`--mode=sample` draws
curation.pool_factor x R x |D| when curation is enabled). A segmenter trained on real data only
(curation.scorer: the experiment's R=0 run of seed `seed`, or the metric encoder) scores every
candidate at its own input size (pipeline.segmentation_size):

  pixel filter  loss = the scorer's cross-entropy against the generated label. For each class c,
                over every labelled pixel of class c in the *real train split*,
                  threshold_c = mean_c + curation.pixel_tolerance x std_c
                and pool pixels above their generated class's threshold become no-data
                (data.ignore_index). A class the train split lacks has no threshold (+inf).
                Thresholds per class, because rare or thin classes are harder even when their
                masks are right (FreeMask, Yang et al. 2023, scales the class-wise mean loss of the
                real images by a margin). They come from real pairs, not from the pool: a class
                the generator always draws wrong would otherwise earn a loose threshold from its
                own errors.
  pair filter   label fidelity, class-balanced: for each class of a pair's generated mask, the
                fraction of its pixels the scorer's argmax agrees with; their mean over the
                classes the pair holds (before any pixel is filtered). A pair's dominant class
                (field, background) cannot hide a class drawn wrong. Pairs below
                curation.min_fidelity are dropped whole, and so are pairs with no labelled pixel left.
  selection     exactly R x |D| of the remaining pairs, without replacement, deterministic for
                `seed`: "uniform" (the ablation), or "hard_rare", with probability proportional to
                  score(pair) = sum_c w_c x kept_c(pair) / kept(pair),
                  w_c ∝ hardness_c / sqrt(frequency_c),
                where hardness_c is the scorer's mean loss on class c over the real *train* split and
                frequency_c its pixel share in the train manifest (w_c = 0 for a class absent from
                train). Only the train split is read: val and test are never opened, so the
                selection cannot tune to the numbers the experiment reports.

The curated pairs keep the pool's pixels, size and ids: the keep-mask is computed at the
scorer's size and mapped back by nearest neighbour when that differs from the records' size.
The set lands in synthetic/<pool set>_curated/ with its config.json (the pool's identity, the
scorer's run and weights id, the curation settings) and a manifest that also says how many
pairs and pixels were dropped; report/class_frequency_curation.png compares the class pixel
fractions of real train, pool and curated sets.

Cost: the scorer runs twice over the pool (fidelity, then the filter) and once over the train
split: (2 P R + 1) |D| forward passes of a segmenter, small beside sampling
(each sample costs sample.ddim_steps or diffusion.timesteps passes of the larger U-Net).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from satsynth_jax import (checkpoint, identity, parallel, report, resolved, sample_quality, segmenter, viz,
                          workdir as layout)
from satsynth_jax.config_check import CURATION_SCORERS, CURATION_SELECTIONS
from satsynth_jax.data import pipeline, records
from satsynth_jax.errors import SatSynthError

REMEDY = "delete it (or curate into another --workdir) to curate again"
# Float32 losses compared with float64 statistics: equal losses must never fall above their own mean.
_SLACK = 1e-6
_SELECTION_STREAM = 0xC0A7E  # seed stream of the selection, apart from any other use of `seed`


class CurationError(SatSynthError, ValueError):
  """A pool that cannot give the curated set (too small, too few survivors); the message names the settings."""


# ---- pure maths: per-pixel losses, class statistics, filters, weights, selection ----


def pixel_losses(logits: jax.Array, mask: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy of `logits` [..., H, W, K] against `mask` [..., H, W], 0 where unlabelled; argmax)."""
  labelled = mask != ignore_index
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(labelled, mask, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(labelled, -picked, 0.0), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def class_loss_moments(loss: np.ndarray, mask: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
  """float64 [3, K]: per generated class, (pixel count, sum of losses, sum of squared losses)."""
  labelled = np.asarray(mask) != ignore_index
  classes = np.asarray(mask)[labelled].astype(np.intp)
  values = np.asarray(loss, np.float64)[labelled]
  return np.stack([np.bincount(classes, minlength=num_classes).astype(np.float64),
                   np.bincount(classes, weights=values, minlength=num_classes),
                   np.bincount(classes, weights=values * values, minlength=num_classes)])


def class_mean_loss(moments: np.ndarray) -> np.ndarray:
  """Mean loss per class from class_loss_moments; NaN for a class without pixels."""
  count, total, _ = moments
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def class_thresholds(moments: np.ndarray, tolerance: float) -> np.ndarray:
  """threshold_c = mean_c + tolerance x std_c over the class's pixels; +inf for a class without pixels."""
  count, total, squares = moments
  safe = np.maximum(count, 1)
  mean = total / safe
  std = np.sqrt(np.maximum(squares / safe - mean * mean, 0.0))
  threshold = mean + tolerance * std
  threshold = threshold + _SLACK * (np.abs(threshold) + 1.0)
  return np.where(count > 0, threshold, np.inf)


def keep_mask(loss: np.ndarray, mask: np.ndarray, thresholds: np.ndarray, ignore_index: int) -> np.ndarray:
  """bool, True where the pixel is labelled and its loss is at most its generated class's threshold."""
  mask = np.asarray(mask)
  labelled = mask != ignore_index
  limit = np.asarray(thresholds, np.float64)[np.where(labelled, mask, 0).astype(np.intp)]
  return labelled & (np.asarray(loss, np.float64) <= limit)


def label_fidelity(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Per pair [B]: the mean, over the classes `mask` [B, H, W] holds, of the fraction of that class's pixels
  where `pred` agrees (class-balanced recall); NaN for a pair without labelled pixels (no-data: values >= K)."""
  mask, pred = np.asarray(mask), np.asarray(pred)
  classes = np.arange(num_classes)[:, None, None, None]  # [K, 1, 1, 1] against [B, H, W]
  of_class = mask[None] == classes
  count = of_class.sum(axis=(2, 3))  # [K, B]
  agree = (of_class & (pred[None] == classes)).sum(axis=(2, 3))
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.where(count > 0, agree / np.maximum(count, 1), np.nan)
    return np.nanmean(recall, axis=0) if recall.size else np.full(mask.shape[0], np.nan)


def resize_nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """[h, w] -> shape by the nearest pixel at the same pixel centres (the pipeline's mask rule)."""
  height, width = array.shape
  rows = ((np.arange(shape[0]) + 0.5) * (height / shape[0])).astype(np.intp)
  cols = ((np.arange(shape[1]) + 0.5) * (width / shape[1])).astype(np.intp)
  return array[rows[:, None], cols[None, :]]


def filtered_mask(mask: np.ndarray, keep: np.ndarray, ignore_index: int) -> np.ndarray:
  """The record's mask with every pixel not kept set to no-data; `keep` at any size (mapped back)."""
  if keep.shape != mask.shape:
    keep = resize_nearest(keep, mask.shape)
  return np.where(keep, mask, ignore_index).astype(mask.dtype)


def class_weights(class_loss: np.ndarray, class_pixels: np.ndarray) -> np.ndarray:
  """w_c ∝ hardness_c / sqrt(pixel frequency_c), summing to 1; 0 for a class the train split lacks."""
  pixels = np.asarray(class_pixels, np.float64)
  present = pixels > 0
  frequency = pixels / max(pixels.sum(), 1.0)
  hardness = np.nan_to_num(np.asarray(class_loss, np.float64), nan=0.0)
  weights = np.where(present, hardness / np.sqrt(np.where(present, frequency, 1.0)), 0.0)
  if weights.sum() <= 0:  # a perfect scorer: rarity alone
    weights = np.where(present, 1.0 / np.sqrt(np.where(present, frequency, 1.0)), 0.0)
  return weights / weights.sum()


def pair_scores(kept_class_pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Per pair: sum_c w_c x kept_c / kept, the class-weighted share of its kept pixels."""
  kept = np.asarray(kept_class_pixels, np.float64)
  return kept @ np.asarray(weights, np.float64) / np.maximum(kept.sum(axis=1), 1.0)


def select(candidates: np.ndarray, count: int, selection: str, scores: np.ndarray | None, seed: int) -> np.ndarray:
  """`count` of `candidates` without replacement, sorted; uniform or with probability ∝ `scores`.

  Weighted: Efraimidis-Spirakis keys log(u) / score, the largest taken (the same law as drawing
  one at a time in proportion to score); zero-score candidates come last, in random order.
  """
  candidates = np.asarray(candidates)
  if count > len(candidates):
    raise ValueError(f"cannot select {count} of {len(candidates)} candidates")
  rng = np.random.default_rng([seed, _SELECTION_STREAM])
  if selection == "uniform":
    return np.sort(rng.choice(candidates, size=count, replace=False))
  if selection != "hard_rare":
    raise ValueError(f"selection {selection!r} is not one of {CURATION_SELECTIONS}")
  scores = np.asarray(scores, np.float64)
  u = rng.random(len(candidates))
  with np.errstate(divide="ignore"):
    keys = np.where(scores > 0, np.log(u) / np.where(scores > 0, scores, 1.0), -np.inf)
  order = np.lexsort((-u, -keys))  # keys descending, then u
  return np.sort(candidates[order[:count]])


# ---- the scorer over a record folder ----


def scorer_run(config) -> segmenter.Run:
  """The segmenter trained on real data only that curation.scorer names."""
  if config.curation.scorer == "metric_encoder":
    return segmenter.Run.metric_encoder(config)
  if config.curation.scorer == "real_only":
    return segmenter.Run.arm(config, 0, config.seed, None)
  raise ValueError(f"curation.scorer {config.curation.scorer!r} is not one of {CURATION_SCORERS}")


def scorer_id(run: segmenter.Run, variables, step: int) -> str:
  """"<run>@<step>:<first 12 hex digits of sha256 of its weights>" (sample_quality.weights_id's hash)."""
  return run.name + sample_quality.weights_id(variables, step)[len(segmenter.METRIC_ENCODER):]


def make_score_fn(model: nn.Module, mesh, ignore_index: int):
  """Jitted (variables, image [B, S, S, 3], mask [B, S, S]) -> (loss, argmax), batch-sharded on `mesh`."""

  def score(variables, image, mask):
    return pixel_losses(model.apply(variables, image, train=False), mask, ignore_index)

  sharded = parallel.batch_sharding(mesh)
  return jax.jit(score, in_shardings=(parallel.replicated(mesh), sharded, sharded), out_shardings=(sharded, sharded))


def _record_indices(batch: int, rows: int, rows_per_process: int, process_count: int) -> np.ndarray:
  """The record index of each global row: process p's k-th eval example is record k x n + p."""
  row = np.arange(rows)
  return (batch * rows_per_process + row % rows_per_process) * process_count + row // rows_per_process


def scored_batches(config, score_fn, variables, record_dir, mesh) -> Iterator[tuple[np.ndarray, ...]]:
  """(record indices, loss, argmax, mask) of every example of `record_dir` at the scorer's size.

  One ordered pass through the eval pipeline; padding rows are dropped. Every process gets
  every row (gathered), so all of them compute the same statistics and selection.
  """
  local = parallel.per_process_batch_size(config.segmentation.eval_batch_size, "segmentation.eval_batch_size", mesh)
  batches = pipeline.segmentation_batches(config, record_dir, batch_size=local, seed=config.seed, train=False)
  processes = jax.process_count()

  def fetch(pending):
    b, (loss, pred), mask, valid = pending
    loss, pred, mask, valid = parallel.to_host((loss, pred, mask, valid))
    index = _record_indices(b, len(valid), local, processes)
    return index[valid], loss[valid], pred[valid], mask[valid]

  pending = None
  with jax.set_mesh(mesh):
    for b, batch in enumerate(batches):
      batch = parallel.to_global({"image": batch["image"], "mask": batch["mask"], "valid": batch["valid"]}, mesh)
      current = (b, score_fn(variables, batch["image"], batch["mask"]), batch["mask"], batch["valid"])
      if pending is not None:  # fetch one batch behind, so the device never waits for the host
        yield fetch(pending)
      pending = current
  if pending is not None:
    yield fetch(pending)


def pool_statistics(config, batches_fn, num_pool: int) -> tuple[np.ndarray, np.ndarray]:
  """(class loss moments [3, K], label fidelity per pair [N]) of a record folder from one scoring pass."""
  d = config.data
  moments = np.zeros((3, d.num_classes))
  fidelity = np.full(num_pool, np.nan)
  for index, loss, pred, mask in batches_fn():
    moments += class_loss_moments(loss, mask, d.num_classes, d.ignore_index)
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a pair without labels: NaN, as documented
      fidelity[index] = label_fidelity(pred, mask, d.num_classes)
  return moments, fidelity


def pool_filter(config, batches_fn, num_pool: int, thresholds: np.ndarray,
                wanted: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray], int, int]:
  """(kept pixels per pair and class [N, K], packed keep-masks of the `wanted` pairs, labelled and
  ignored pixels over the pool) from a second scoring pass, at the scorer's size."""
  d = config.data
  kept_class_pixels = np.zeros((num_pool, d.num_classes), np.int64)
  keeps, labelled, ignored = {}, 0, 0
  for index, loss, _, mask in batches_fn():
    keep = keep_mask(loss, mask, thresholds, d.ignore_index)
    has_label = mask != d.ignore_index
    labelled += int(has_label.sum())
    ignored += int((has_label & ~keep).sum())
    for i, row_keep, row_mask in zip(index, keep, mask):
      kept_class_pixels[i] = np.bincount(row_mask[row_keep], minlength=d.num_classes)
      if wanted[i]:
        keeps[int(i)] = np.packbits(row_keep)
  return kept_class_pixels, keeps, labelled, ignored


# ---- the job ----


def shaping(config, pool_dir, num_real: int, scorer: str) -> dict:
  """The settings that shape a curated set: its pool (recorded identity), scorer and curation settings."""
  u = config.curation
  recorded = identity.read(pool_dir)
  pool_manifest = records.read_manifest(pool_dir)
  pool = recorded["shaping"] if recorded else {"source": pool_manifest["source"]}
  return {"pool": pool, "pool_size": pool_manifest["num_examples"], "scorer": scorer,
          "scoring_size": resolved.segmenter_size(config), "data.resize": config.data.resize,
          "curation.scorer": u.scorer, "curation.pixel_tolerance": u.pixel_tolerance,
          "curation.min_fidelity": u.min_fidelity, "curation.selection": u.selection,
          "per_real": config.sample.per_real, "num_real": num_real, "count": config.sample.per_real * num_real,
          "examples_per_shard": config.sample.examples_per_shard, "seed": config.seed}


def is_curated(config, workdir, pool_dir, out_dir) -> bool:
  """Done-check without loading the scorer: out_dir holds a finished set of this config and pool,
  scored by the latest checkpoint of the scorer run (other recorded settings are refused)."""
  recorded = identity.read(out_dir)
  if recorded is None:
    return False
  scorer = recorded["shaping"].get("scorer", "")
  try:
    expected = shaping(config, pool_dir, records.read_manifest(layout.data_dir(workdir, "train"))["num_examples"],
                       scorer)
  except records.RecordError:  # no pool or no train split yet
    return False
  identity.check(out_dir, expected, "this curated set", REMEDY)
  run = scorer_run(config)
  step = checkpoint.latest_step(layout.checkpoint_dir(workdir, run.name))
  return _finished(out_dir, scorer) and scorer.startswith(f"{run.name}@{step}:")


def _finished(out_dir, scorer: str) -> bool:
  """out_dir holds a verified manifest with the counts curate writes last (scored by `scorer`)."""
  try:
    return records.read_manifest(out_dir).get("scorer") == scorer
  except records.RecordError:
    return False


def _too_few(config, survivors: int, needed: int, pool: int, dropped_fidelity: int, dropped_empty: int) -> str:
  u = config.curation
  return (f"curation kept {survivors} of {pool} pool pairs ({dropped_fidelity} below "
          f"curation.min_fidelity={u.min_fidelity}, {dropped_empty} without labelled pixels) but needs "
          f"sample.per_real x |D| = {needed}; lower curation.min_fidelity, raise curation.pixel_tolerance, "
          f"or sample a larger pool (curation.pool_factor={u.pool_factor})")


def curate_set(config, workdir, pool_dir, out_dir, scorer: segmenter.Run) -> dict:
  """Score, filter and select `pool_dir` into `out_dir`; returns the curated set's manifest.

  Idempotent: a finished set of the same identity is returned as is; one of another identity is
  refused (identity.SettingsMismatchError). Every process scores; process 0 writes.
  """
  d, u = config.data, config.curation
  train_dir = layout.data_dir(workdir, "train")
  real = records.read_manifest(train_dir)
  pool_manifest = records.read_manifest(pool_dir)
  num_pool, needed = pool_manifest["num_examples"], config.sample.per_real * real["num_examples"]
  if needed < 1:
    raise CurationError(f"config.sample.per_real={config.sample.per_real}: curation keeps R x |D| pairs, so R >= 1")
  if num_pool < needed:
    raise CurationError(f"{pool_dir} holds {num_pool} pairs but curation keeps sample.per_real x |D| = {needed}; "
                        f"sample a pool of curation.pool_factor x {needed} (pool_factor >= 1) first")
  if os.path.realpath(pool_dir) == os.path.realpath(out_dir):  # curating would overwrite what it reads
    raise CurationError(f"{pool_dir} is both the pool and the curated set; point data.synthetic_dir at the sampled "
                        f"pool (not a curated set), or leave it unset")
  mesh = parallel.make_mesh()
  model, variables, step = segmenter.restore(config, workdir, scorer, mesh)
  scorer_name = scorer_id(scorer, variables, step)
  expected = shaping(config, pool_dir, real["num_examples"], scorer_name)
  is_writer = jax.process_index() == 0
  if identity.check(out_dir, expected, "this curated set", REMEDY) and _finished(out_dir, scorer_name):
    return records.read_manifest(out_dir)  # a mismatch raised above; a recorded but unfinished set is redone
  logging.info("curate: %d pool pairs in %s scored by %s", num_pool, pool_dir, scorer_name)

  score_fn = make_score_fn(model, mesh, d.ignore_index)
  # The scorer's losses on real train pairs set every class's threshold and hardness (val and test
  # are never opened).
  train_moments, _ = pool_statistics(
      config, functools.partial(scored_batches, config, score_fn, variables, train_dir, mesh), real["num_examples"])
  thresholds = class_thresholds(train_moments, u.pixel_tolerance)
  batches = functools.partial(scored_batches, config, score_fn, variables, pool_dir, mesh)
  _, fidelity = pool_statistics(config, batches, num_pool)
  unlabelled = np.isnan(fidelity)
  low = ~unlabelled & (fidelity < u.min_fidelity)
  kept_class_pixels, keeps, pool_labelled, pool_ignored = pool_filter(config, batches, num_pool, thresholds,
                                                                      ~(unlabelled | low))
  empty = ~low & (kept_class_pixels.sum(axis=1) == 0)  # unlabelled, or nothing left after the filter
  candidates = np.flatnonzero(~low & ~empty)
  if len(candidates) < needed:
    raise CurationError(_too_few(config, len(candidates), needed, num_pool, int(low.sum()), int(empty.sum())))

  weights = scores = None
  if u.selection == "hard_rare":
    weights = class_weights(class_mean_loss(train_moments), real["class_pixels"])
    scores = pair_scores(kept_class_pixels[candidates], weights)
  chosen = select(candidates, needed, u.selection, scores, config.seed)

  if is_writer:
    manifest = _write(config, pool_dir, out_dir, chosen, keeps, {
        "curated_from": os.fspath(pool_dir), "pool_size": num_pool, "scorer": scorer_name,
        "selection": u.selection, "pixel_tolerance": u.pixel_tolerance, "min_fidelity": u.min_fidelity,
        "dropped_pairs_fidelity": int(low.sum()), "dropped_pairs_empty": int(empty.sum()),
        "survivors": len(candidates),
        "pool_labelled_pixels": pool_labelled, "pool_ignored_pixels": pool_ignored,
        "pool_ignored_fraction": pool_ignored / max(pool_labelled, 1),
        "class_thresholds": [None if np.isinf(t) else float(t) for t in thresholds],
        "class_weights": None if weights is None else weights.tolist(),
        "mean_fidelity": float(np.nanmean(fidelity)) if not unlabelled.all() else None})
    identity.record(out_dir, config, expected)  # last: the set counts as done only once complete
    _report(config, workdir, real, pool_manifest, manifest)
  parallel.barrier("curate: set written")
  return records.read_manifest(out_dir)


def _write(config, pool_dir, out_dir, chosen: np.ndarray, keeps: dict[int, np.ndarray], meta: dict) -> dict:
  """The chosen pool pairs with filtered masks at the records' own size; the manifest counts at that size."""
  d = config.data
  source = records.PairSource(pool_dir)
  size = resolved.segmenter_size(config)
  counts = {"labelled": 0, "ignored": 0}

  def pairs():
    for i in chosen:
      pair = source[int(i)]
      keep = np.unpackbits(keeps[int(i)], count=size * size).reshape(size, size).astype(bool)
      mask = filtered_mask(pair["mask"], keep, d.ignore_index)
      labelled = pair["mask"] != d.ignore_index
      counts["labelled"] += int(labelled.sum())
      counts["ignored"] += int((labelled & (mask == d.ignore_index)).sum())
      yield records.Pair(image=pair["image"], mask=mask, id=pair["id"], source=pair["source"],
                         num_classes=pair["num_classes"])

  written = records.write_records(out_dir, pairs(), num_classes=d.num_classes, class_names=list(d.class_names),
                                  source=source.manifest["source"], examples_per_shard=config.sample.examples_per_shard,
                                  overwrite=True)
  source.close()
  # Counted while writing, so the manifest is rewritten once with them (atomically).
  records.write_manifest(out_dir, written["shards"], num_classes=d.num_classes, class_names=list(d.class_names),
                         source=written["source"], **meta, labelled_pixels_before=counts["labelled"],
                         ignored_pixels=counts["ignored"],
                         ignored_fraction=counts["ignored"] / max(counts["labelled"], 1))
  return records.read_manifest(out_dir)


def _report(config, workdir, real: dict, pool: dict, curated: dict) -> None:
  """report/class_frequency_curation.png and a few lines: pool, drops, ignored pixels, class shares."""
  chart = report.class_frequency_chart(config, {"real": real, "pool": pool, "curated": curated},
                                       "class pixel fraction: real train vs sampled pool vs curated")
  viz.save_png(chart, layout.report_path(workdir, "class_frequency_curation.png"))
  pixels = np.asarray(curated["class_pixels"], np.float64)
  shares = ", ".join(f"{name} {100 * p / max(pixels.sum(), 1):.2f}%"
                     for name, p in zip(config.data.class_names, pixels))
  print(f"curate: {curated['num_examples']} of {curated['pool_size']} pool pairs kept ({curated['selection']}) "
        f"by {curated['scorer']}\n"
        f"  dropped pairs: {curated['dropped_pairs_fidelity']} below min_fidelity {curated['min_fidelity']}, "
        f"{curated['dropped_pairs_empty']} without labelled pixels\n"
        f"  ignored pixels: {100 * curated['pool_ignored_fraction']:.2f}% of the pool's labelled pixels, "
        f"{100 * curated['ignored_fraction']:.2f}% of the kept pairs'\n"
        f"  kept class pixels: {shares}", flush=True)


def run(config, workdir) -> dict:
  """--mode=curate: the config's sampled set (the pool) -> synthetic/<set>_curated/, scored by curation.scorer."""
  return curate_set(config, workdir, resolved.synthetic_dir(config, workdir), resolved.curated_dir(config, workdir),
                    scorer_run(config))
