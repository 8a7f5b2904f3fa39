"""Segmentation across two processes (2 CPU devices each, gloo collectives) equals one process.

train_segmentation, evaluate and evaluate_samples run through the real CLI on a loopback
jax.distributed pair (mp_launch); each is compared with the same job run in this process on
4 devices. The scoring tests share only a checkpoint saved in this process (a module fixture)
and launch their own jobs, so one failing leaves the others' verdicts standing.
"""

import dataclasses
import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest

import mp_launch
from conftest import load_config
from satsynth_jax import resolved, segmenter
from satsynth_jax.data import pipeline
from satsynth_jax.infra import checkpoint, identity, parallel, workdir as layout
from satsynth_jax.jobs import evaluate, prepare, sample_quality
from satsynth_jax.train import loop, segmentation

NUM_PROCESSES = mp_launch.NUM_PROCESSES
# The smallest segmenter the demo allows: one block per ResNet stage, 16 px inputs, 8 train and
# 8 val patches.
TINY = {
    "data.image_size": 16, "data.patch_size": 32, "data.demo_num_scenes": 2, "data.demo_scene_size": 64,
    "data.read_threads": 1, "segmentation.architecture": "unet", "segmentation.backbone_stages": (1, 1, 1, 1),
    "segmentation.train.batch_size": 8, "segmentation.train.num_steps": 4, "segmentation.train.warmup_steps": 1,
    "segmentation.train.log_every": 2, "segmentation.train.checkpoint_every": 4, "segmentation.eval_every": 0,
    "segmentation.eval_batch_size": 8,
    # A small rate keeps two runs' float32 reduction-order differences at rounding size by step 4.
    "segmentation.train.lr": 1e-3,
}
RUN = "unet_r0_s0"


def _config(**more):
  return load_config("demo", **{**TINY, **more})


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
  """(workdir, logs folder) with demo records and a freshly initialised segmenter saved as step 4
  of RUN, made in this process: the scoring tests need a checkpoint, not a trained one."""
  workdir = tmp_path_factory.mktemp("checkpointed")
  config = _config()
  prepare.run(config, str(workdir))
  state = segmentation.init_state(segmenter.build(config, "unet"), resolved.segmenter_size(config),
                                  config.segmentation.train, jax.random.key(1))
  directory = layout.checkpoint_dir(str(workdir), RUN)
  run = resolved.SegmenterRun.from_config(config)
  identity.record(directory, config, segmenter.shaping(config, run, None, str(workdir)))  # as training records it
  mngr = checkpoint.manager(directory)
  checkpoint.save(mngr, 4, state)
  mngr.wait_until_finished()
  return workdir, tmp_path_factory.mktemp("logs")


def _global_batches(config, train_dir, num_steps: int) -> list[dict]:
  """Step i's global batch as the pair assembles it: process 0's rows, then process 1's."""
  per_process = config.segmentation.train.batch_size // NUM_PROCESSES
  streams = [iter(pipeline.segmentation_batches(config, train_dir, batch_size=per_process, seed=config.seed,
                                                train=True, process_index=p, process_count=NUM_PROCESSES))
             for p in range(NUM_PROCESSES)]
  steps = []
  for _ in range(num_steps):
    parts = [next(s) for s in streams]
    steps.append({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
  return steps


def _restore(config, workdir, run=RUN):
  mesh = parallel.make_mesh()
  task = segmentation.make_task(config, str(workdir), mesh, resolved.SegmenterRun(run, "unet", 0, config.seed))
  mngr = checkpoint.manager(layout.checkpoint_dir(str(workdir), run), create=False)
  state, _ = checkpoint.restore(mngr, loop.abstract_state(task, mesh, config.seed))
  return parallel.to_host({"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state})


def _log(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics", f"{RUN}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_training_on_two_processes_equals_one_process_on_the_same_global_batches(tmp_path):
  config = _config()
  multi, single, logs = tmp_path / "two_processes", tmp_path / "one_process", tmp_path / "logs"
  logs.mkdir()
  prepare.run(config, str(multi))
  shutil.copytree(multi / "data", single / "data")
  mp_launch.launch_ok(multi, "train_segmentation", TINY, logs)
  mesh = parallel.make_mesh()
  assert mesh.size == 2 * NUM_PROCESSES
  batches = _global_batches(config, str(multi / "data" / "train"), config.segmentation.train.num_steps)
  run = resolved.SegmenterRun.from_config(config)
  task = dataclasses.replace(segmentation.make_task(config, str(single), mesh, run),
                             make_batches=lambda: iter(grain.MapDataset.source(batches).to_iter_dataset()))
  loop.train(task, config.segmentation.train, str(single), seed=run.seed, mesh=mesh)

  mp_launch.assert_logs_match(_log(multi), _log(single), [2, 4], atol=1e-6)
  two, one = _restore(config, multi), _restore(config, single)
  mp_launch.assert_states_match(two, one, ("params", "batch_stats", "opt_state"))


def test_evaluate_on_two_processes_counts_each_held_out_example_once_and_matches_one_process(checkpointed, tmp_path):
  prepared, logs = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(prepared, workdir)
  mp_launch.launch_ok(workdir, "evaluate", TINY, logs)
  two = json.loads((workdir / "metrics" / f"eval_{RUN}.json").read_text())
  one = evaluate.evaluate_run(_config(), str(workdir), resolved.SegmenterRun.from_config(_config()))  # rewrites the JSON
  again = json.loads((workdir / "metrics" / f"eval_{RUN}.json").read_text())
  for split, count in (("val", 8), ("test", 16)):  # every held-out patch, none twice, no padding
    assert two["splits"][split]["num_examples"] == again["splits"][split]["num_examples"] == count
    assert two["splits"][split]["confusion_matrix"] == again["splits"][split]["confusion_matrix"]
    assert two["splits"][split]["scores"]["miou"] == pytest.approx(one[split]["miou"], abs=1e-12)
  assert two["checkpoint_step"] == 4
  assert (workdir / "report" / f"eval_{RUN}.png").exists()


def test_evaluate_samples_on_two_processes_matches_one_process(checkpointed, tmp_path):
  prepared, logs = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(prepared, workdir)
  # The cpu preset's encoder is the R=0 run of seed 0 (sample_quality.encoder=real_only): RUN. Score the
  # val split as the "synthetic" set, a labelled record folder like a sampled one.
  scored = {**TINY, "data.synthetic_dir": str(workdir / "data" / "val")}
  mp_launch.launch_ok(workdir, "evaluate_samples", scored, logs)
  path = workdir / "metrics" / f"{sample_quality.output_name('val')}.json"
  two = json.loads(path.read_text())
  one = sample_quality.run_for(_config(**{"data.synthetic_dir": scored["data.synthetic_dir"]}), str(workdir),
                               scored["data.synthetic_dir"], "val")
  assert two["num_real"] == one["num_real"] == 8 and two["num_synthetic"] == one["num_synthetic"] == 8
  assert two["metric_encoder"] == one["metric_encoder"] and two["metric_encoder"].startswith(f"{RUN}@4:")
  for key in ("fid", "sfid", "label_fidelity_miou"):
    assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
  assert two["is"]["mean"] == pytest.approx(one["is"]["mean"], rel=1e-4)
