"""--mode=sample: draw R x |D| synthetic pairs from G's EMA weights into TFRecord shards.

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

import json
import math
import os

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from satsynth_jax import atomic, checkpoint, parallel, viz
from satsynth_jax.data import records
from satsynth_jax.train import diffusion, super_resolution


def synthetic_dir(workdir: str, joint_labels: bool = True) -> str:
  """Where `sample` writes: synthetic/ for the joint model, synthetic_image_only/ for the baseline."""
  return os.path.join(workdir, "synthetic" if joint_labels else "synthetic_image_only")


def _plan(config, num_real: int, step: int, sr_step: int | None) -> dict:
  s = config.sample
  return {"checkpoint_step": step, "per_real": s.per_real, "num_real": num_real,
          "requested": s.per_real * num_real, "examples_per_shard": s.examples_per_shard,
          "sampler": s.sampler, "ddim_steps": s.ddim_steps, "ddim_eta": s.ddim_eta, "seed": config.seed,
          "image_size": config.sr.image_size if sr_step is not None else config.data.image_size,
          "label_encoding": config.data.label_encoding, "joint_labels": config.diffusion.joint_labels,
          "super_resolution_step": sr_step}


def _check_plan(out_dir: str, plan: dict, write: bool) -> None:
  """A directory started with other settings is refused rather than mixed; `write` records a new plan."""
  path = os.path.join(out_dir, "plan.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if diff := sorted(k for k in plan if old.get(k) != plan[k]):
      changes = ", ".join(f"{k}: {old.get(k)!r} -> {plan[k]!r}" for k in diff)
      raise ValueError(f"{out_dir} holds samples made with other settings ({changes}); "
                       f"delete it to sample again")
  elif write:
    atomic.write_json(path, plan)


def restore_generator_params(config, workdir: str, mesh, step: int | None):
  """(model, EMA params replicated on `mesh`, checkpoint step) of G."""
  model = diffusion.make_model(config)
  state, step = checkpoint.restore_for_inference(
      workdir, diffusion.model_name(config), lambda rng: diffusion.init_state(config, model, rng), mesh, step)
  return model, state.eval_params, step


def _pairs(config, joint: np.ndarray, first_index: int, step: int):
  images, masks = diffusion.decode_samples(config, joint)
  for i, (image, mask) in enumerate(zip(images, masks)):
    yield records.Pair(image=image, mask=mask, id=f"synthetic_{first_index + i:07d}",
                       source=f"synthetic:{step}", num_classes=config.data.num_classes)


def _make_draw(config, workdir: str, mesh, batch: int, params, generate):
  """(draw, sr_step): draw(key) -> G's samples, or with config.sample.super_resolve the cascade's
  (G_SR high-res, G low-res) pair of batches; sr_step is G_SR's checkpoint step (None without it).
  """
  if not config.sample.super_resolve:
    return (lambda key: generate(params, key)), None
  s = config.sample
  sr_model, sr_params, sr_step = super_resolution.restore_sr_params(config, workdir, mesh, s.sr_checkpoint_step)
  upsample = super_resolution.make_upsample_fn(config, sr_model, mesh, batch, sampler=s.sampler,
                                               ddim_steps=s.ddim_steps, ddim_eta=s.ddim_eta)

  def draw(key):
    low = generate(params, key)
    return upsample(sr_params, jax.random.fold_in(key, 1), low), low

  return draw, sr_step


def run(config, workdir: str) -> None:
  real = records.read_manifest(os.path.join(workdir, "data", "train"))
  out_dir = synthetic_dir(workdir, config.diffusion.joint_labels)
  batch = parallel.per_process_batch_size(config.sample.batch_size, "sample.batch_size")
  mesh = parallel.make_mesh(jax.local_devices())
  model, params, step = restore_generator_params(config, workdir, mesh, config.sample.checkpoint_step)
  generate = diffusion.make_generate_fn(config, model, mesh, batch, sampler=config.sample.sampler,
                                        ddim_steps=config.sample.ddim_steps, ddim_eta=config.sample.ddim_eta)
  draw, sr_step = _make_draw(config, workdir, mesh, batch, params, generate)
  plan = _plan(config, real["num_examples"], step, sr_step)
  process, num_processes = jax.process_index(), jax.process_count()
  is_writer = process == 0
  os.makedirs(out_dir, exist_ok=True)
  _check_plan(out_dir, plan, write=is_writer)

  total, per_shard = plan["requested"], plan["examples_per_shard"]
  counts = [min(per_shard, total - start) for start in range(0, total, per_shard)]
  # A fixed owner per shard: the processes never need to agree on who draws what.
  todo = [s for s in range(process, len(counts), num_processes)
          if records.shard_record_count(os.path.join(out_dir, records.shard_filename(s))) != counts[s]]
  logging.info("sample: %d pairs in %d shards from checkpoint %d; process %d of %d writes shards %s", total,
               len(counts), step, process, num_processes, todo)
  base = jax.random.fold_in(jax.random.key(config.seed), step)
  with jax.set_mesh(mesh), tqdm(total=sum(counts[s] for s in todo), desc="sample", unit="pair",
                                disable=not is_writer, dynamic_ncols=True) as bar:
    for s in todo:
      shard_key = jax.random.fold_in(base, s)
      drawn = [draw(jax.random.fold_in(shard_key, b)) for b in range(math.ceil(counts[s] / batch))]
      if sr_step is not None:
        if s == 0:
          _write_cascade_grid(config, workdir, *parallel.to_host(drawn[0][::-1]))
        drawn = [high for high, _ in drawn]
      joint = np.concatenate([parallel.to_host(x) for x in drawn])[:counts[s]]
      records.write_shard(os.path.join(out_dir, records.shard_filename(s)),
                          _pairs(config, joint, s * per_shard, step))
      bar.update(counts[s])

  parallel.barrier("sample: every shard written")
  if is_writer:
    shards = [records.shard_entry(os.path.join(out_dir, records.shard_filename(s))) for s in range(len(counts))]
    records.write_manifest(out_dir, shards, num_classes=config.data.num_classes,
                           class_names=config.data.class_names, source=f"synthetic:{step}", **plan)
    write_report(config, workdir, real, records.read_manifest(out_dir))


def _write_cascade_grid(config, workdir: str, low: np.ndarray, high: np.ndarray) -> None:
  """G's 128px pairs beside G_SR's 256px pairs (low-res enlarged to the same size)."""
  n = min(8, len(low))
  factor = high.shape[1] // low.shape[1]
  low = np.repeat(np.repeat(low[:n], factor, axis=1), factor, axis=2)
  images, masks = diffusion.decode_samples(config, np.concatenate([low, high[:n]]))
  order = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]  # low, high, low, high...
  grid = diffusion.sample_grid(config, images[order], masks[order],
                               "cascade: G (low-res, enlarged) | G_SR (high-res), pair by pair")
  viz.save_png(grid, os.path.join(workdir, "samples", "cascade_grid.png"))


def write_report(config, workdir: str, real: dict, synthetic: dict) -> None:
  """PNGs a user checks first: a grid of synthetic pairs and real vs synthetic class frequencies."""
  source = records.PairSource(synthetic_dir(workdir, config.diffusion.joint_labels))
  picks = [source[i] for i in range(min(16, len(source)))]
  grid = diffusion.sample_grid(config, np.stack([p["image"] for p in picks]), np.stack([p["mask"] for p in picks]),
                               f"synthetic pairs ({synthetic['source']})")
  viz.save_png(grid, os.path.join(workdir, "samples", "synthetic_grid.png"))
  fractions = {name: np.asarray(m["class_pixels"], np.float64) / max(1, sum(m["class_pixels"]))
               for name, m in (("real", real), ("synthetic", synthetic))}
  chart = viz.grouped_bar_chart(fractions, list(config.data.class_names),
                                title="class pixel fraction: real vs synthetic", log=True)
  viz.save_png(chart, os.path.join(workdir, "report", "class_frequency_real_vs_synthetic.png"))
