"""--mode=sample: draw P x R x |D| synthetic pairs from G's EMA weights into TFRecord shards.

R = sample.per_real, P = curation.pool_factor with curation.enabled (else 1: the paper's R x |D|). A segmenter
arm with ratio R trains on the set's first R x |D| pairs (an unbiased draw); curation
(curate.py) picks its R x |D| from the whole pool. A class-presence conditioned G draws pair j
with request j of the set's sampling plan (presence.py, sample.presence), saved beside the set.

Shard s always holds the same examples for a given process count (its noise comes from
fold_in(seed, s)), and each shard is written atomically, so an interrupted run is completed by
re-running it: finished shards are kept, missing ones are generated, and the manifest is
written last.

Several processes: sampling needs no communication, so each process draws whole shards on
its own devices (shard s belongs to process s % process_count) and writes them to the shared
workdir; once every process is done, process 0 writes the manifest and the report.
sample.batch_size stays the global batch: each process generates batch / process_count
pairs per call, so every device holds as many as in a single-process run.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from satsynth_jax import generator, labels, presence, resolved
from satsynth_jax.data import pipeline, records
from satsynth_jax.infra import atomic, checkpoint, identity, parallel, report, viz, workdir as layout
from satsynth_jax.infra.errors import SatSynthError


class SampleError(SatSynthError, ValueError):
  """Samples that must not become a synthetic set (non-finite values); the message names the checkpoint."""


def presence_plan(config, gconfig) -> dict | None:
  """The set's sampling plan for a presence-conditioned G (None for an unconditioned one)."""
  if not resolved.conditioned(gconfig):
    return None
  s = config.sample
  return {"presence": s.presence, "require_classes": list(s.require_classes), "guidance": resolved.guidance(config)}


def plan(config, gconfig, num_real: int, step: int, sr_step: int | None, sr_config=None, workdir=None) -> dict:
  """The settings that shape a synthetic set: the generator (run, step, its settings and, given `workdir`,
  the prepared data it learned from), G_SR's (with the cascade; `sr_config` is the config it was trained
  with), the sampler and the presence plan."""
  s = config.sample
  return {"presence_plan": presence_plan(config, gconfig), "generator": resolved.g_run(config), "checkpoint_step": step,
          "generator_settings": generator.g_shaping(gconfig, workdir),
          "super_resolution": resolved.sr_run(config) if sr_step is not None else None,
          "super_resolution_step": sr_step, "per_real": s.per_real, "num_real": num_real,
          "pool_factor": resolved.pool_factor(config),
          "requested": resolved.pool_factor(config) * s.per_real * num_real, "examples_per_shard": s.examples_per_shard,
          "sampler": s.sampler, "ddim_steps": s.ddim_steps, "ddim_eta": s.ddim_eta, "seed": config.seed,
          "super_resolution_settings": generator.sr_shaping(sr_config, workdir) if sr_step is not None else None,
          "image_size": sr_config.sr.image_size if sr_step is not None else gconfig.data.image_size,
          "num_classes": gconfig.data.num_classes, "label_encoding": gconfig.data.label_encoding,
          "no_data_code": gconfig.data.no_data_code, "joint_labels": gconfig.diffusion.joint_labels,
          "prediction": gconfig.diffusion.prediction}


def is_complete(config, workdir) -> bool:
  """Does the config's set hold every pair its plan asks for, drawn from the current G (and G_SR)?
  A set made under another plan is refused (identity.SettingsMismatchError)."""
  out_dir = resolved.synthetic_dir(config, workdir)
  try:
    manifest = records.read_manifest(out_dir)
    real = records.read_manifest(layout.data_dir(workdir, "train"))
  except records.RecordError:
    return False
  g_run = resolved.g_run(config)
  step = checkpoint.latest_step(layout.checkpoint_dir(workdir, g_run))
  sr_config = sr_step = None
  if config.sample.super_resolve:
    sr_step = checkpoint.latest_step(layout.checkpoint_dir(workdir, resolved.sr_run(config)))
    sr_config = generator.trained_config(config, workdir, resolved.sr_run(config))
  expected = plan(config, generator.trained_config(config, workdir, g_run), real["num_examples"], step, sr_step,
                  sr_config, workdir)
  identity.check(out_dir, expected, "this synthetic set", "delete it (or use another --workdir) to sample again")
  return manifest["num_examples"] == expected["requested"]


def _pairs(config, joint: np.ndarray, first_index: int, step: int, rng: np.random.Generator):
  images, masks = generator.decode_samples(config, joint, rng)
  for i, (image, mask) in enumerate(zip(images, masks)):
    yield records.Pair(image=image, mask=mask, id=f"synthetic_{first_index + i:07d}",
                       source=f"synthetic:{step}", num_classes=config.data.num_classes)


def _make_draw(config, gconfig, workdir, mesh, batch: int, params, generate):
  """(draw, sr_config, sr_step): draw(key, requests) -> G's samples (asked for `requests` [batch, K], or
  unconditional for None), or with config.sample.super_resolve the cascade's (G_SR high-res, G low-res)
  pair of batches; sr_step is G_SR's step (None without it).
  """
  if not config.sample.super_resolve:
    return (lambda key, requests: generate(params, key, requests)), None, None
  s = config.sample
  sr_config, sr_model, sr_params, sr_step = generator.restore_sr(config, workdir, mesh, s.sr_checkpoint_step)
  shared = [k for k in generator.G_SHAPING if k != "diffusion.model"]  # G_SR reads G's pairs: these must agree
  mismatch = identity.differences(identity.select(gconfig, shared), identity.select(sr_config, shared))
  if mismatch:
    raise SampleError(f"G ({resolved.g_run(config)}) and G_SR ({resolved.sr_run(config)}) were trained with "
                      f"other label or schedule settings: {'; '.join(mismatch)}")
  upsample = generator.make_upsample_fn(sr_config, sr_model, mesh, batch, sampler=s.sampler,
                                        ddim_steps=s.ddim_steps, ddim_eta=s.ddim_eta)

  def draw(key, requests):
    low = generate(params, key, requests)
    return upsample(sr_params, jax.random.fold_in(key, 1), low), low

  return draw, sr_config, sr_step


def _fetch(drawn, count: int, cascade: bool, where: str) -> tuple[np.ndarray, tuple | None]:
  """Host copy of one shard's draws (high-res only for the cascade), checked finite."""
  first = parallel.to_host(drawn[0][::-1]) if cascade else None  # (low, high) of the first batch
  if cascade:
    drawn = [high for high, _ in drawn]
  joint = np.concatenate([parallel.to_host(x) for x in drawn])[:count]
  if not np.isfinite(joint).all():
    raise SampleError(f"{where} produced non-finite samples ({int((~np.isfinite(joint)).sum())} values): the "
                      "checkpoint is damaged or diverged; nothing was written for this shard")
  return joint, first


def _shard_done(path: str, count: int) -> bool:
  """Whether a resumed set's shard holds its `count` records intact; a truncated or corrupt one (or one
  without its index) is drawn again, so the manifest written last never meets it."""
  if not os.path.exists(path):
    return False
  try:
    return records.shard_entry(path)["count"] == count
  except records.RecordError as e:
    logging.warning("%s; sampling that shard again", e)
    return False


def run(config, workdir) -> None:
  """--mode=sample: P x R x |D| pairs of this config's generator into synthetic/<set>/, resumable."""
  s = config.sample
  real = records.read_manifest(layout.data_dir(workdir, "train"))
  out_dir = resolved.synthetic_dir(config, workdir)
  batch = parallel.per_process_batch_size(s.batch_size, "sample.batch_size")
  mesh = parallel.make_mesh(jax.local_devices())
  gconfig, model, params, step = generator.restore_g(config, workdir, mesh, s.checkpoint_step)
  generate = generator.make_generate_fn(gconfig, model, mesh, batch, sampler=s.sampler, ddim_steps=s.ddim_steps,
                                        ddim_eta=s.ddim_eta, guidance_scale=resolved.guidance(config))
  draw, sr_config, sr_step = _make_draw(config, gconfig, workdir, mesh, batch, params, generate)
  out_config = sr_config if sr_config is not None else gconfig  # what the set's pairs are decoded with
  shaping = plan(config, gconfig, real["num_examples"], step, sr_step, sr_config, workdir)
  process, num_processes = jax.process_index(), jax.process_count()
  is_writer = process == 0
  identity.ensure(out_dir, config, shaping, "this synthetic set",
                  "delete it (or sample into another --workdir) to sample again", write=is_writer)

  total, per_shard = shaping["requested"], shaping["examples_per_shard"]
  requests = _requests(config, gconfig, workdir, out_dir, total, write=is_writer)
  counts = [min(per_shard, total - start) for start in range(0, total, per_shard)]
  # A fixed owner per shard: the processes never need to agree on who draws what.
  todo = [i for i in range(process, len(counts), num_processes)
          if not _shard_done(os.path.join(out_dir, records.shard_filename(i)), counts[i])]
  logging.info("sample: %d pairs in %d shards from checkpoint %d; process %d of %d writes shards %s", total,
               len(counts), step, process, num_processes, todo)
  base = jax.random.fold_in(jax.random.key(config.seed), step)
  where = f"{resolved.g_run(config)} step {step}" + (f" through {resolved.sr_run(config)} step {sr_step}"
                                                        if sr_step is not None else "")

  def dispatch(shard: int):
    """Start shard `shard`'s draws; JAX runs them while the host encodes the previous shard."""
    key = jax.random.fold_in(base, shard)
    return [draw(jax.random.fold_in(key, b), _batch_requests(requests, shard * per_shard + b * batch, batch))
            for b in range(math.ceil(counts[shard] / batch))]

  with jax.set_mesh(mesh), tqdm(total=sum(counts[i] for i in todo), desc="sample", unit="pair",
                                disable=not is_writer, dynamic_ncols=True) as bar:
    pending = dispatch(todo[0]) if todo else None
    for n, shard in enumerate(todo):
      drawn = pending
      pending = dispatch(todo[n + 1]) if n + 1 < len(todo) else None
      joint, first = _fetch(drawn, counts[shard], sr_step is not None, where)
      if first is not None and shard == 0:
        _write_cascade_grid(out_config, workdir, *first)
      rng = np.random.default_rng([config.seed, step, shard])  # breaks exact label-code ties
      records.write_shard(os.path.join(out_dir, records.shard_filename(shard)),
                          _pairs(out_config, joint, shard * per_shard, step, rng))
      bar.update(counts[shard])

  parallel.barrier("sample: every shard written")
  if is_writer:
    shards = [records.shard_entry(os.path.join(out_dir, records.shard_filename(i))) for i in range(len(counts))]
    records.write_manifest(out_dir, shards, num_classes=config.data.num_classes,
                           class_names=config.data.class_names, source=f"synthetic:{step}",
                           **{k: v for k, v in shaping.items()
                              if k not in ("generator_settings", "super_resolution_settings", "num_classes")})
    write_report(config, workdir, out_dir, real, records.read_manifest(out_dir))


def _requests(config, gconfig, workdir, out_dir, total: int, *, write: bool) -> np.ndarray | None:
  """The plan's request per pair (None: unconditional), saved beside the set as presence.REQUESTS_FILE."""
  s = config.sample
  if s.presence == "none" or gconfig.diffusion.condition != "presence":
    return None
  train_dir = layout.data_dir(workdir, "train")
  requests = presence.plan_vectors(s.presence, train_vectors(gconfig, train_dir), total,
                                   class_pixels=records.read_manifest(train_dir)["class_pixels"],
                                   require=presence.class_indices(gconfig.data.class_names, s.require_classes),
                                   seed=config.seed)
  if write:
    atomic.write(os.path.join(out_dir, presence.REQUESTS_FILE), lambda f: np.save(f, requests))
  return requests


def train_vectors(config, record_dir) -> np.ndarray:
  """uint8 [N, K]: the classes each real pair of `record_dir` holds at data.image_size (in record order),
  as G (trained with `config`) saw them: the plans' input."""
  source = pipeline.open_records(record_dir, config)
  pairs = pipeline.pairs(source, config, seed=config.seed, train=False, process_index=0, process_count=1)
  k = config.data.num_classes
  return np.stack([labels.presence(pairs[i]["mask"], k) for i in range(len(pairs))]).astype(np.uint8)


def _batch_requests(requests: np.ndarray | None, start: int, batch: int) -> np.ndarray | None:
  """Rows start..start+batch of the requests, padded with the last row past the end (those samples are dropped)."""
  if requests is None:
    return None
  rows = requests[start:start + batch]
  if len(rows) < batch:
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), axis=0)])
  return rows.astype(np.float32)


def _write_cascade_grid(config, workdir: str, low: np.ndarray, high: np.ndarray) -> None:
  """G's 128px pairs beside G_SR's 256px pairs (low-res enlarged to the same size)."""
  n = min(8, len(low))
  factor = high.shape[1] // low.shape[1]
  low = np.repeat(np.repeat(low[:n], factor, axis=1), factor, axis=2)
  images, masks = generator.decode_samples(config, np.concatenate([low, high[:n]]), np.random.default_rng(0))
  order = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]  # low, high, low, high...
  grid = generator.sample_grid(config, images[order], masks[order],
                               "cascade: G (low-res, enlarged) | G_SR (high-res), pair by pair")
  viz.save_png(grid, layout.samples_path(workdir, "cascade_grid.png"))


def write_report(config, workdir, out_dir, real: dict, synthetic: dict) -> None:
  """PNGs a user checks first: a grid of synthetic pairs and real vs synthetic class frequencies."""
  source = records.PairSource(out_dir)
  picks = [source[i] for i in range(min(16, len(source)))]
  grid = generator.sample_grid(config, np.stack([p["image"] for p in picks]), np.stack([p["mask"] for p in picks]),
                               f"synthetic pairs ({synthetic['source']})")
  viz.save_png(grid, layout.samples_path(workdir, "synthetic_grid.png"))
  chart = report.class_frequency_chart(config, {"real": real, "synthetic": synthetic},
                                       "class pixel fraction: real vs synthetic")
  viz.save_png(chart, layout.report_path(workdir, "class_frequency_real_vs_synthetic.png"))
