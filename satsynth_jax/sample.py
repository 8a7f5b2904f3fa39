"""--mode=sample: draw R x |D| synthetic pairs from G's EMA weights into TFRecord shards.

Shard s always holds the same examples (its noise comes from fold_in(seed, s)), and each
shard is written atomically, so an interrupted run is completed by re-running it: finished
shards are kept, missing ones are generated, and the manifest is written last.
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
from satsynth_jax.train import diffusion


def synthetic_dir(workdir: str) -> str:
  return os.path.join(workdir, "synthetic")


def _plan(config, num_real: int, step: int) -> dict:
  s = config.sample
  return {"checkpoint_step": step, "per_real": s.per_real, "num_real": num_real,
          "requested": s.per_real * num_real, "examples_per_shard": s.examples_per_shard,
          "sampler": s.sampler, "ddim_steps": s.ddim_steps, "ddim_eta": s.ddim_eta, "seed": config.seed,
          "image_size": config.data.image_size, "label_encoding": config.data.label_encoding}


def _check_plan(out_dir: str, plan: dict) -> None:
  """A directory started with other settings is refused rather than mixed."""
  path = os.path.join(out_dir, "plan.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if diff := sorted(k for k in plan if old.get(k) != plan[k]):
      changes = ", ".join(f"{k}: {old.get(k)!r} -> {plan[k]!r}" for k in diff)
      raise ValueError(f"{out_dir} holds samples made with other settings ({changes}); "
                       f"delete it to sample again")
  else:
    atomic.write_json(path, plan)


def restore_generator_params(config, workdir: str, mesh, step: int | None):
  """(EMA params replicated on `mesh`, checkpoint step) of G."""
  model = diffusion.make_model(config)
  abstract = jax.eval_shape(lambda rng: diffusion.init_state(config, model, rng), jax.random.key(0))
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  mngr = checkpoint.manager(checkpoint.checkpoint_dir(workdir, diffusion.MODEL_NAME), read_only=True)
  step = checkpoint.resolve_step(mngr, step)
  state, _ = checkpoint.restore(mngr, abstract, step)
  return model, state.eval_params, step


def _pairs(config, joint: np.ndarray, first_index: int, step: int):
  images, masks = diffusion.decode_samples(config, joint)
  for i, (image, mask) in enumerate(zip(images, masks)):
    yield records.Pair(image=image, mask=mask, id=f"synthetic_{first_index + i:07d}",
                       source=f"synthetic:{step}", num_classes=config.data.num_classes)


def run(config, workdir: str) -> None:
  real = records.read_manifest(os.path.join(workdir, "data", "train"))
  out_dir = synthetic_dir(workdir)
  mesh = parallel.make_mesh()
  batch = config.sample.batch_size
  parallel.per_process_batch_size(batch, "sample.batch_size", mesh)
  model, params, step = restore_generator_params(config, workdir, mesh, config.sample.checkpoint_step)
  plan = _plan(config, real["num_examples"], step)
  os.makedirs(out_dir, exist_ok=True)
  _check_plan(out_dir, plan)

  total, per_shard = plan["requested"], plan["examples_per_shard"]
  counts = [min(per_shard, total - start) for start in range(0, total, per_shard)]
  todo = [s for s, n in enumerate(counts)
          if records.shard_record_count(os.path.join(out_dir, records.shard_filename(s))) != n]
  logging.info("sample: %d pairs in %d shards from checkpoint %d; %d shards to write", total, len(counts), step,
               len(todo))
  generate = diffusion.make_generate_fn(config, model, mesh, batch, sampler=config.sample.sampler,
                                        ddim_steps=config.sample.ddim_steps, ddim_eta=config.sample.ddim_eta)
  base = jax.random.fold_in(jax.random.key(config.seed), step)
  is_writer = jax.process_index() == 0
  with jax.set_mesh(mesh), tqdm(total=sum(counts[s] for s in todo), desc="sample", unit="pair",
                                disable=not is_writer, dynamic_ncols=True) as bar:
    for s in todo:
      shard_key = jax.random.fold_in(base, s)
      joint = np.concatenate([parallel.to_host(generate(params, jax.random.fold_in(shard_key, b)))
                              for b in range(math.ceil(counts[s] / batch))])[:counts[s]]
      if is_writer:
        records.write_shard(os.path.join(out_dir, records.shard_filename(s)),
                            _pairs(config, joint, s * per_shard, step))
      bar.update(counts[s])

  if is_writer:
    shards = [records.shard_entry(os.path.join(out_dir, records.shard_filename(s))) for s in range(len(counts))]
    records.write_manifest(out_dir, shards, num_classes=config.data.num_classes,
                           class_names=config.data.class_names, source=f"synthetic:{step}", **plan)
    write_report(config, workdir, real, records.read_manifest(out_dir))


def write_report(config, workdir: str, real: dict, synthetic: dict) -> None:
  """PNGs a user checks first: a grid of synthetic pairs and real vs synthetic class frequencies."""
  source = records.PairSource(synthetic_dir(workdir))
  picks = [source[i] for i in range(min(16, len(source)))]
  grid = diffusion.sample_grid(config, np.stack([p["image"] for p in picks]), np.stack([p["mask"] for p in picks]),
                               f"synthetic pairs ({synthetic['source']})")
  viz.save_png(grid, os.path.join(workdir, "samples", "synthetic_grid.png"))
  fractions = {name: np.asarray(m["class_pixels"], np.float64) / max(1, sum(m["class_pixels"]))
               for name, m in (("real", real), ("synthetic", synthetic))}
  chart = viz.grouped_bar_chart(fractions, list(config.data.class_names),
                                title="class pixel fraction: real vs synthetic", log=True)
  viz.save_png(chart, os.path.join(workdir, "report", "class_frequency_real_vs_synthetic.png"))
