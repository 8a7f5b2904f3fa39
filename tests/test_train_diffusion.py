"""Training G: sharded step equals single-device step; train -> sample -> resumable synthetic records."""

import copy
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import TINY_G_RUN, load_config, prepared_demo
from satsynth_jax import generator, resolved
from satsynth_jax.data import records
from satsynth_jax.infra import identity, parallel, workdir as layout
from satsynth_jax.jobs import sample, train_diffusion, train_sr
from satsynth_jax.train import diffusion

TINY = {**TINY_G_RUN, "diffusion.train.sample_every": 4, "diffusion.train.num_grid_samples": 4,
        "diffusion.train.grid_sampler_steps": 5, "sample.per_real": 2, "sample.ddim_steps": 5, "sample.examples_per_shard": 8}


def test_sharded_step_equals_single_device_step():
  config = load_config("demo", **TINY)
  model = generator.build_g(config)
  sched = generator.make_schedule(config)
  _, lr = diffusion.optim.make_optimizer(config.diffusion.train)
  batch = {"x": np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 6)).astype(np.float32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.jit(lambda r: diffusion.init_state(model, 8, 6, config.diffusion.train, r),
                    out_shardings=rep)(jax.random.key(0))
    step = jax.jit(lambda s, b: diffusion.train_step(s, b, model=model, sched=sched, prediction="eps",
                                                     lr_schedule=lr),
                   in_shardings=(rep, sharded), out_shardings=(rep, rep))
    with jax.set_mesh(mesh):
      state, metrics = step(state, parallel.to_global(batch, mesh))
      state, metrics = step(state, parallel.to_global(batch, mesh))
    results.append((float(metrics["loss"]), parallel.to_host(state.params)))
  assert len(jax.devices()) == 4
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config, workdir = prepared_demo(tmp_path_factory, "demo", TINY)
  train_diffusion.run(config, workdir)
  return config, workdir


def test_training_writes_checkpoints_metrics_and_a_sample_grid(trained):
  config, workdir = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "diffusion_x0"))) == ["2", "4", "config.json"]
  lines = open(os.path.join(workdir, "metrics", "diffusion_x0.jsonl")).read().splitlines()
  assert len(lines) == 2 and '"loss_label"' in lines[0]
  assert os.path.exists(os.path.join(workdir, "samples", "diffusion_x0_step00000004.png"))


def test_sampling_writes_r_times_d_pairs_and_completes_after_interruption(trained):
  config, workdir = trained
  num_real = records.read_manifest(os.path.join(workdir, "data", "train"))["num_examples"]
  sample.run(config, workdir)
  out = str(layout.synthetic_dir(workdir, "diffusion_x0"))
  manifest = records.read_manifest(out)
  assert manifest["num_examples"] == resolved.pool_factor(config) * 2 * num_real
  assert manifest["source"] == "synthetic:4"
  source = records.PairSource(out)
  ids = [source[i]["id"] for i in range(len(source))]
  assert len(set(ids)) == len(ids)
  masks = np.stack([source[i]["mask"] for i in range(len(source))])
  assert masks.max() < config.data.num_classes
  assert source[0]["image"].shape == (8, 8, 3)
  for png in ("samples/synthetic_grid.png", "report/class_frequency_real_vs_synthetic.png"):
    assert os.path.exists(os.path.join(workdir, png))

  # Interruption: the manifest and the last shard never got written.
  last = os.path.join(out, records.shard_filename(len(manifest["shards"]) - 1))
  first = os.path.join(out, records.shard_filename(0))
  first_mtime = os.stat(first).st_mtime_ns
  last_bytes = open(last, "rb").read()
  for path in (os.path.join(out, "manifest.json"), last, last + ".index"):
    os.remove(path)
  sample.run(config, workdir)
  assert records.read_manifest(out)["num_examples"] == resolved.pool_factor(config) * 2 * num_real
  assert os.stat(first).st_mtime_ns == first_mtime  # finished shards are kept, not redone
  assert open(last, "rb").read() == last_bytes  # the redone shard is the same draw


def test_sampling_refuses_a_directory_made_with_other_settings(trained):
  config, workdir = trained
  config = copy.deepcopy(config)
  config.sample.per_real = 3
  with pytest.raises(identity.SettingsMismatchError, match=r"per_real: 2 -> 3"):
    sample.run(config, workdir)


def test_cascade_sampling_writes_super_resolved_records_and_a_side_by_side_grid(trained):
  config, workdir = trained
  config = copy.deepcopy(config)
  config.sr.image_size = 16
  config.sr.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
  config.sr.train.update(batch_size=8, num_steps=2, warmup_steps=1, log_every=1, checkpoint_every=2, sample_every=0)
  config.sample.super_resolve = True
  config.sample.per_real = 1
  train_sr.run(config, workdir)
  cascade_workdir = workdir + "_cascade"
  shutil.copytree(workdir, cascade_workdir, ignore=shutil.ignore_patterns("synthetic*"))
  sample.run(config, cascade_workdir)
  out = layout.synthetic_dir(cascade_workdir, "diffusion_x0_cascade")
  manifest = records.read_manifest(out)
  assert manifest["super_resolution_step"] == 2 and manifest["image_size"] == 16
  pair = records.PairSource(out)[0]
  assert pair["image"].shape == (16, 16, 3) and pair["mask"].shape == (16, 16)
  assert os.path.exists(os.path.join(cascade_workdir, "samples", "cascade_grid.png"))


def test_image_only_baseline_trains_without_label_channels_and_writes_blank_masks(trained):
  config, workdir = trained
  config = copy.deepcopy(config)
  config.diffusion.joint_labels = False
  config.diffusion.train.num_steps = 2
  config.sample.per_real = 1
  state = train_diffusion.run(config, workdir)
  assert state.params["conv_in"]["kernel"].shape[2] == 3  # RGB only
  sample.run(config, workdir)
  out = layout.synthetic_dir(workdir, "diffusion_x0_image_only")
  pair = records.PairSource(out)[0]
  assert (pair["mask"] == config.data.ignore_index).all()


def test_resuming_g_under_another_width_is_refused_naming_the_key(trained):
  config, workdir = trained
  wider = copy.deepcopy(config)
  wider.diffusion.model.ch = 64
  with pytest.raises(identity.SettingsMismatchError, match=r"diffusion\.model\.ch: 32 -> 64"):
    train_diffusion.run(wider, workdir)


def test_sampling_builds_g_from_its_recorded_config_without_the_training_overrides(trained, tmp_path):
  config, workdir = trained
  fresh = str(tmp_path / "fresh")
  shutil.copytree(workdir, fresh, ignore=shutil.ignore_patterns("synthetic*"))
  plain = load_config("demo", **{k: v for k, v in TINY.items() if not k.startswith("diffusion.model")})
  assert tuple(plain.diffusion.model.ch_mult) != tuple(config.diffusion.model.ch_mult)
  plain.sample.per_real = 1
  sample.run(plain, fresh)
  manifest = records.read_manifest(layout.synthetic_dir(fresh, "diffusion_x0"))
  recorded = identity.read(layout.synthetic_dir(fresh, "diffusion_x0"))["shaping"]
  num_real = records.read_manifest(os.path.join(fresh, "data", "train"))["num_examples"]
  assert manifest["num_examples"] == resolved.pool_factor(plain) * num_real
  assert recorded["generator_settings"]["diffusion.model.ch_mult"] == [1]  # the trained layout


class _Killed(Exception):
  """Stands in for a kill between checkpoints."""


def test_g_killed_between_checkpoints_resumes_bit_for_bit(trained, tmp_path, monkeypatch):
  """A run killed at step 4 (checkpoint at 2, steps 3-4 computed, step 4 logged) and rerun ends
  with the same parameters, optimizer state and loss log as the fixture's uninterrupted run: the
  data iterator and step come back from the checkpoint and the log drops the dead run's step 4."""
  import json  # noqa: PLC0415

  from satsynth_jax.infra import checkpoint  # noqa: PLC0415
  from satsynth_jax.train import loop  # noqa: PLC0415

  config, reference = trained
  config = copy.deepcopy(config)
  config.diffusion.train.sample_every = 0  # previews draw no training randomness; skip their cost
  resumed = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(reference, "data"), os.path.join(resumed, "data"))
  save = checkpoint.save

  def save_unless_4(mngr, step, *args, **kwargs):
    if step == 4:
      raise _Killed
    return save(mngr, step, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(loop.checkpoint, "save", save_unless_4)
    with pytest.raises(_Killed):
      train_diffusion.run(config, resumed)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints", "diffusion_x0"))) == ["2", "config.json"]
  got = train_diffusion.run(config, resumed)

  mesh = parallel.make_mesh()
  task = diffusion.make_task(config, reference, mesh)
  mngr = checkpoint.manager(layout.checkpoint_dir(reference, "diffusion_x0"), create=False)
  expected, _ = checkpoint.restore(mngr, loop.abstract_state(task, mesh, config.seed), step=4)
  assert int(got.step) == int(expected.step) == 4
  for name in ("params", "ema_params", "opt_state"):
    a, b = parallel.to_host(getattr(got, name)), parallel.to_host(getattr(expected, name))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(x, y, err_msg=name)

  def log(workdir):
    with open(os.path.join(workdir, "metrics", "diffusion_x0.jsonl"), encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  assert [m["step"] for m in log(resumed)] == [2, 4]
  assert log(resumed) == log(reference)
