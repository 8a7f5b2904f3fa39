"""`--mode=curate`: score a pool of sampled pairs, filter their noisy pixels, select R x |D| of them.

The pool is a synthetic record set of at least R x |D| candidates (`--mode=sample` draws
curation.pool_factor x R x |D| when curation is enabled). A segmenter trained on real data only
(curation.scorer: the experiment's R=0 run of seed `seed`, or the metric encoder) scores every
candidate at its own input size (resolved.segmenter_size):

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
                When fewer than R x |D| pairs pass (a scorer trained on few scenes agrees with few
                generated pairs, e.g. LoveDA at 32 px), the most faithful of the dropped pairs that
                keep a labelled pixel fill the set, and the log and manifest count them
                ("filled_below_min_fidelity"); only when even those are too few does the job stop.
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

import os

import jax
import numpy as np
from absl import logging

from satsynth_jax import resolved, segmenter
from satsynth_jax.data import records
from satsynth_jax.infra import checkpoint, identity, parallel, report, viz, workdir as layout
from satsynth_jax.infra.errors import SatSynthError
from satsynth_jax.metrics import curation

REMEDY = "delete it (or curate into another --workdir) to curate again"


class CurationError(SatSynthError, ValueError):
  """A pool that cannot give the curated set (too small, too few survivors); the message names the settings."""


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


def is_complete(config, workdir) -> bool:
  """Done-check without loading the scorer: the config's curated set is finished, made from its pool
  and scored by the latest checkpoint of the scorer run (other recorded settings are refused)."""
  pool_dir, out_dir = resolved.synthetic_dir(config, workdir), resolved.curated_dir(config, workdir)
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
  run = resolved.curation_scorer(config)
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
          f"sample.per_real x |D| = {needed}, and too few of the others keep a labelled pixel to fill it; raise "
          f"curation.pixel_tolerance, or sample a larger pool (curation.pool_factor > {u.pool_factor})")


def curate_set(config, workdir, pool_dir, out_dir, scorer: resolved.SegmenterRun) -> dict:
  """Score, filter and select `pool_dir` into `out_dir`; returns the curated set's manifest.

  Idempotent: a finished set of the same identity is returned as is; one of another identity is
  refused (identity.SettingsMismatchError). Every process scores; process 0 writes.
  """
  d, u = config.data, config.curation
  train_dir = layout.data_dir(workdir, "train")
  real = records.read_manifest(train_dir)
  pool_manifest = records.read_manifest(pool_dir)
  num_pool, needed = pool_manifest["num_examples"], config.sample.per_real * real["num_examples"]
  if num_pool < needed:
    raise CurationError(f"{pool_dir} holds {num_pool} pairs but curation keeps sample.per_real x |D| = {needed}; "
                        f"sample a pool of curation.pool_factor x {needed} (pool_factor >= 1) first")
  if os.path.realpath(pool_dir) == os.path.realpath(out_dir):  # curating would overwrite what it reads
    raise CurationError(f"{pool_dir} is both the pool and the curated set; point data.synthetic_dir at the sampled "
                        f"pool (not a curated set), or leave it unset")
  mesh = parallel.make_mesh()
  model, variables, step = segmenter.restore(config, workdir, scorer, mesh)
  scorer_name = checkpoint.weights_id(scorer.name, variables, step)
  expected = shaping(config, pool_dir, real["num_examples"], scorer_name)
  is_writer = jax.process_index() == 0
  if identity.check(out_dir, expected, "this curated set", REMEDY) and _finished(out_dir, scorer_name):
    return records.read_manifest(out_dir)  # a mismatch raised above; a recorded but unfinished set is redone
  logging.info("curate: %d pool pairs in %s scored by %s", num_pool, pool_dir, scorer_name)

  score_fn = segmenter.make_score_fn(model, mesh, d.ignore_index)

  def scored(record_dir):
    return segmenter.scored_batches(config, score_fn, variables, record_dir, mesh)

  # The scorer's losses on real train pairs set every class's threshold and hardness (val and test
  # are never opened).
  train_moments, _ = curation.pool_statistics(scored(train_dir), real["num_examples"], d.num_classes, d.ignore_index)
  thresholds = curation.class_thresholds(train_moments, u.pixel_tolerance)
  _, fidelity = curation.pool_statistics(scored(pool_dir), num_pool, d.num_classes, d.ignore_index)
  unlabelled = np.isnan(fidelity)
  low = ~unlabelled & (fidelity < u.min_fidelity)
  kept_class_pixels, keeps, pool_labelled, pool_ignored = curation.pool_filter(
      scored(pool_dir), num_pool, d.num_classes, d.ignore_index, thresholds, ~unlabelled)
  labelled_left = kept_class_pixels.sum(axis=1) > 0  # false: unlabelled, or nothing left after the filter
  empty = ~low & ~labelled_left
  candidates = np.flatnonzero(~low & labelled_left)
  below = np.flatnonzero(low & labelled_left)
  filled = below[np.argsort(-fidelity[below], kind="stable")][:max(needed - len(candidates), 0)]
  if len(candidates) + len(filled) < needed:
    raise CurationError(_too_few(config, len(candidates), needed, num_pool, int(low.sum()), int(empty.sum())))
  candidates = np.sort(np.concatenate([candidates, filled]))

  weights = scores = None
  if u.selection == "hard_rare":
    weights = curation.class_weights(curation.class_mean_loss(train_moments), real["class_pixels"])
    scores = curation.pair_scores(kept_class_pixels[candidates], weights)
  chosen = curation.select(candidates, needed, u.selection, scores, config.seed)

  if is_writer:
    manifest = _write(config, pool_dir, out_dir, chosen, keeps, {
        "curated_from": os.fspath(pool_dir), "pool_size": num_pool, "scorer": scorer_name,
        "selection": u.selection, "pixel_tolerance": u.pixel_tolerance, "min_fidelity": u.min_fidelity,
        "dropped_pairs_fidelity": int(low.sum() - len(filled)), "dropped_pairs_empty": int(empty.sum()),
        "filled_below_min_fidelity": len(filled), "survivors": len(candidates),
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
      mask = curation.filtered_mask(pair["mask"], keep, d.ignore_index)
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
        + (f"  filled: {curated['filled_below_min_fidelity']} of the kept pairs are below min_fidelity (too few "
           f"passed; the most faithful of the rest)\n" if curated["filled_below_min_fidelity"] else "") +
        f"  ignored pixels: {100 * curated['pool_ignored_fraction']:.2f}% of the pool's labelled pixels, "
        f"{100 * curated['ignored_fraction']:.2f}% of the kept pairs'\n"
        f"  kept class pixels: {shares}", flush=True)


def run(config, workdir) -> dict:
  """--mode=curate: the config's sampled set (the pool) -> synthetic/<set>_curated/, scored by curation.scorer."""
  return curate_set(config, workdir, resolved.synthetic_dir(config, workdir), resolved.curated_dir(config, workdir),
                    resolved.curation_scorer(config))
