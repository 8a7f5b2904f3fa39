"""Trust, round 2: nothing reused under other settings or on other data, no settings mismatch reported as
damage, damaged or missing records named in one line, and the guards held while they are relied on.

CLI cases run as a user meets them (exit code 2, one `satsynth_jax: error:` line, no traceback); the
workdir fixture is prepared, G trained to steps 2 and 4 and its set sampled once, then copied per test.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, config_flag, cpu_env, load_config, paper_method_flags, run_main
from satsynth_jax import resolved, segmenter
from satsynth_jax.data import records, splits
from satsynth_jax.infra import checkpoint, cli as command_line, identity, lock, workdir as layout
from satsynth_jax.jobs import prepare
from satsynth_jax.train import segmentation
from test_reliability import RUN, TINY, cli, error_line
from test_reliability_checkpoint import _abstract, _inference_abstract, _init, _mesh

SEGMENTER = {**TINY, "segmentation.image_size": 32, "segmentation.eval_batch_size": 4,
             "segmentation.train.batch_size": 4, "segmentation.eval_every": 0}
SET = "diffusion_x0"  # the set TINY samples


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trust")
  for mode in ("prepare", "train_diffusion", "sample"):
    run_main(mode, workdir, TINY)
  return workdir


@pytest.fixture
def copy(sampled, tmp_path):
  target = tmp_path / "w"
  shutil.copytree(sampled, target, symlinks=True)
  return target


def _g_config_json(workdir):
  return layout.checkpoint_dir(workdir, RUN) / identity.CONFIG_FILE


# ---- item 2: every model knows the prepared data it was made from ----

def test_g_is_neither_resumed_nor_sampled_on_data_prepared_again_at_another_size(copy):
  shutil.rmtree(copy / "data")
  smaller = {**TINY, "data.patch_size": 16}
  run_main("prepare", copy, smaller)
  for mode in ("train_diffusion", "sample"):
    line = error_line(cli(mode, copy, {**smaller, "diffusion.train.num_steps": 6}))
    assert f"run '{RUN}' was made with other settings (" in line and "train_split.data.patch_size: 32 -> 16" in line
  assert sorted(p.name for p in layout.checkpoint_dir(copy, RUN).iterdir() if p.name.isdigit()) == ["2", "4"]


def test_the_prepared_check_refuses_a_workdir_prepared_at_another_patch_size(sampled):
  assert prepare.is_complete(load_config("demo", **TINY), sampled)
  with pytest.raises(splits.PrepareError, match=r"data\.patch_size 32 -> 16"):
    prepare.is_complete(load_config("demo", **{**TINY, "data.patch_size": 16}), sampled)


# ---- item 4: a settings mismatch is named as one, never as damage ----

def _segmenter_run(config, workdir) -> resolved.SegmenterRun:
  """A segmenter run as training leaves it: its config.json and one checkpoint (its initial weights)."""
  run = resolved.SegmenterRun.from_config(config)
  model = segmenter.build(config, run.architecture)
  state = segmentation.init_state(model, resolved.segmenter_size(config), config.segmentation.train,
                                  jax.random.key(0))
  directory = layout.checkpoint_dir(workdir, run.name)
  identity.record(directory, config, segmenter.shaping(config, run, None, workdir))
  mngr = checkpoint.manager(directory)
  checkpoint.save(mngr, 1, state)
  mngr.wait_until_finished()
  return run


def test_evaluating_at_another_width_names_the_key_and_both_values(copy):
  _segmenter_run(load_config("demo", **SEGMENTER), copy)
  result = cli("evaluate", copy, {**SEGMENTER, "segmentation.base_width": 32})
  line = error_line(result)
  assert "run 'fpn_r0_s0' was made with other settings (segmentation.base_width: 16 -> 32)" in line, line
  assert "damaged" not in result.stderr and "Event loop is closed" not in result.stderr


def test_a_segmenter_on_data_prepared_again_is_refused_before_its_checkpoint_is_read(copy):
  config = load_config("demo", **SEGMENTER)
  run = _segmenter_run(config, copy)
  train = copy / "data" / "train" / records.MANIFEST
  manifest = json.loads(train.read_text())
  train.write_text(json.dumps({**manifest, "class_pixels": [n + 1 for n in manifest["class_pixels"]]}))
  with pytest.raises(identity.SettingsMismatchError, match=r"train_split\.digest: "):
    segmenter.restore(config, copy, run, _mesh())


def test_sampling_a_g_whose_recorded_width_differs_from_its_checkpoint_names_the_arrays(copy):
  path = _g_config_json(copy)
  recorded = json.loads(path.read_text())
  recorded["config"]["diffusion.model.ch"] = 64
  path.write_text(json.dumps(recorded))
  result = cli("sample", copy, TINY)
  line = error_line(result)
  assert f"checkpoints/{RUN}/4: not damaged, but saved by a model built with other settings" in line, line
  assert "float32 saved, (" in line and "float32 expected" in line and "damaged (" not in line, line
  assert "Event loop is closed" not in result.stderr


def test_arrays_of_other_shapes_raise_a_settings_error_naming_them_not_damage(tmp_path):
  mngr = checkpoint.manager(tmp_path / "run")
  checkpoint.save(mngr, 1, _init(jax.random.key(0)))
  mngr.wait_until_finished()
  wider = {"params": {"w": jax.ShapeDtypeStruct((32, 64), np.float32)}}
  with pytest.raises(checkpoint.CheckpointSettingsError,
                     match=r"/run/1: not damaged, .*params/w \(64, 64\) float32 saved, \(32, 64\) float32 expected"):
    checkpoint.restore_inference(tmp_path / "run", wider, _mesh())
  state = jax.eval_shape(lambda: _init(jax.random.key(0)).replace(params={"w": np.zeros((8, 8), np.float32)}))
  with pytest.raises(checkpoint.CheckpointSettingsError, match=r"params/w \(64, 64\) float32 saved, \(8, 8\)"):
    checkpoint.restore(mngr, state)


# ---- item 5: a damaged or missing config.json is named, never read as "unrecorded" ----

@pytest.mark.parametrize("text", ["{}", '{"shaping": {}}', "[]", '{"shaping": 1, "config": {}}'])
def test_a_config_json_without_its_two_objects_is_refused_naming_the_file(tmp_path, text):
  (tmp_path / identity.CONFIG_FILE).write_text(text)
  with pytest.raises(identity.UnrecordedError, match=rf"{tmp_path}/config\.json: damaged \("):
    identity.read(tmp_path)


def test_sampling_from_a_g_whose_config_json_is_empty_fails_in_one_line(copy):
  _g_config_json(copy).write_text("{}")
  line = error_line(cli("sample", copy, TINY))
  assert line.endswith(f"{_g_config_json(copy)}: damaged (it needs a \"shaping\" and a \"config\" object); restore "
                       f"config.json from a backup, or delete {_g_config_json(copy).parent} to redo what it holds")


def test_a_pool_set_with_an_empty_config_json_is_refused_by_segmenter_training(copy):
  pool = layout.synthetic_dir(copy, SET)
  (pool / identity.CONFIG_FILE).write_text("{}")
  with pytest.raises(identity.UnrecordedError, match=r"config\.json: damaged"):
    segmentation.synthetic_source(load_config("demo", **TINY), copy, 1, pool)


def test_resuming_a_run_whose_config_json_was_deleted_is_refused_not_re_recorded(copy):
  _g_config_json(copy).unlink()
  line = error_line(cli("train_diffusion", copy, {**TINY, "diffusion.train.num_steps": 6,
                                                  "diffusion.train.lr": 0.5}))
  assert f"{_g_config_json(copy)} is missing, but {_g_config_json(copy).parent} holds outputs of run '{RUN}' " \
         f"(2, 4), made with settings no longer recorded" in line, line
  assert not _g_config_json(copy).exists()


def test_a_new_run_or_set_records_its_settings_and_hidden_temp_files_count_as_nothing(tmp_path):
  config = load_config("demo")
  (tmp_path / ".config.json.host-1.abcdefgh.tmp").write_text("")  # a writer killed before its rename
  identity.ensure(tmp_path, config, {"a": 1}, "it", "remedy")
  assert identity.read(tmp_path)["shaping"] == {"a": 1}


# ---- item 6: one line, never a traceback ----

def test_exporting_a_bucket_set_without_gcsfs_fails_in_one_line(tmp_path):
  cmd = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", *paper_method_flags(), "--mode=export",
         f"--workdir={tmp_path}", config_flag("data.synthetic_dir", "gs://bucket/set")]
  env = cpu_env(devices=1, EPATH_USE_TF="false")  # epath then reads gs:// through gcsfs, absent here
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert "gs://bucket/set: reading a bucket URL needs gcsfs: pip install 'satsynth_jax[gcs]'" in error_line(result)


def test_a_lock_holding_an_impossible_pid_is_taken_over_as_stale(tmp_path, caplog):
  path = layout.lock_path(tmp_path, "prepare")
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({"pid": 99999999999999, "host": socket.gethostname(), "mode": "prepare"}))
  with lock.hold(tmp_path, ["prepare"], "prepare"):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert "pid 99999999999999 is not running" in caplog.text


@pytest.mark.parametrize("pid", [0, -1])
def test_a_lock_naming_a_process_group_is_unreadable(tmp_path, pid):
  path = layout.lock_path(tmp_path, "prepare")
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
  with pytest.raises(lock.LockHeldError, match="prepare.lock: unreadable lock file"):
    with lock.hold(tmp_path, ["prepare"], "prepare"):
      pass


# ---- item 7: a damaged shard of a set being resumed is drawn again ----

def test_rerunning_sample_redraws_a_truncated_shard_and_finishes_the_set(copy):
  out = layout.synthetic_dir(copy, SET)
  shard = out / records.shard_filename(1)
  drawn = shard.read_bytes()
  kept = (out / records.shard_filename(0)).stat().st_mtime_ns
  shard.write_bytes(drawn[:-10])
  result = cli("sample", copy, TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{shard}: record 3: truncated" in result.stderr and "sampling that shard again" in result.stderr
  assert shard.read_bytes() == drawn  # the same draw as before
  assert (out / records.shard_filename(0)).stat().st_mtime_ns == kept  # intact shards are kept
  assert records.shard_entry(shard)["count"] == 4 and records.read_manifest(out)["num_examples"] == 16


def test_sampling_with_data_synthetic_dir_finishes_the_set_there_and_nowhere_else(copy, tmp_path):
  """data.synthetic_dir is where --mode=sample writes (curate, the arms and evaluate_samples read it there)."""
  drawn = layout.synthetic_dir(copy, SET)
  elsewhere = tmp_path / "elsewhere" / "my_set"
  shutil.copytree(drawn, elsewhere)
  (elsewhere / records.MANIFEST).unlink()  # every shard drawn, but not the manifest that finishes the set
  untouched = (drawn / records.MANIFEST).stat().st_mtime_ns
  run_main("sample", copy, {**TINY, "data.synthetic_dir": str(elsewhere)})
  assert records.read_manifest(elsewhere)["num_examples"] == 16
  assert (drawn / records.MANIFEST).stat().st_mtime_ns == untouched


# ---- the guards, held while they are relied on ----

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_state_values_are_refused(tmp_path, value):
  mngr = checkpoint.manager(tmp_path / "run")
  state = _init(jax.random.key(0))
  checkpoint.save(mngr, 1, state.replace(params={"w": state.params["w"].at[0, 0].set(value)}))
  mngr.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointDamagedError, match=r"non-finite values in state params/w\)"):
    checkpoint.restore(mngr, _abstract())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_ema_weights_are_refused_when_inference_reads_them(tmp_path, value):
  mngr = checkpoint.manager(tmp_path / "run")
  state = _init(jax.random.key(0))
  checkpoint.save(mngr, 1, state.replace(ema_params={"w": state.ema_params["w"].at[3, 5].set(value)}))
  mngr.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointDamagedError, match=r"non-finite values in inference params/w\)"):
    checkpoint.restore_inference(tmp_path / "run", _inference_abstract(), _mesh())


def test_a_lock_is_held_for_the_whole_block(tmp_path):
  with lock.hold(tmp_path, ["sample"], "sample"):
    with pytest.raises(lock.LockHeldError, match=rf"sample\.lock: held by pid {os.getpid()} "):
      with lock.hold(tmp_path, ["sample"], "sample"):
        pass


@pytest.mark.parametrize("mode", ["sample", "experiment"])
def test_the_job_lock_is_held_while_the_job_runs(tmp_path, mode):
  from satsynth_jax import main  # noqa: PLC0415  (main defines the absl flags)
  with command_line.job_lock(tmp_path, main.LOCKED_KINDS[mode], mode, True, 1):
    for kind in main.LOCKED_KINDS[mode]:  # what a second job of any of these kinds meets mid-job
      with pytest.raises(lock.LockHeldError, match=rf"{kind}\.lock: held by pid {os.getpid()} "):
        with lock.hold(tmp_path, [kind], kind):
          pass
  with lock.hold(tmp_path, main.LOCKED_KINDS[mode], mode):  # and released after it
    pass


def _first_batch(config, workdir, seed: int) -> np.ndarray:
  task = segmentation.make_task(config, workdir, _mesh(), resolved.SegmenterRun.arm(config, 0, seed, None))
  return np.asarray(next(task.make_batches())["image"])


def test_each_seed_of_an_arm_draws_its_own_data_order_and_augmentation(sampled):
  config = load_config("demo", **SEGMENTER)
  first = _first_batch(config, sampled, 0)
  np.testing.assert_array_equal(first, _first_batch(config, sampled, 0))  # one seed repeats itself
  assert not np.array_equal(first, _first_batch(config, sampled, 1))
