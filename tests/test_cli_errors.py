"""Every user-facing error the README promises, met through the CLI as a user meets it.

Each run is a subprocess of `python -m satsynth_jax.main` on one CPU device: exit code 2 and
exactly one `satsynth_jax: error:` line on stderr naming the file, key or value (error_line;
other stderr lines are absl logs and progress bars), never a traceback. The in-process tests
(test_records, test_sources, test_reliability_checkpoint, test_loop) check the same errors'
wording in detail; these check that the CLI turns them into that one line.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, config_flag, cpu_env, load_config, paper_method_flags
from satsynth_jax.infra import checkpoint, workdir as layout
from satsynth_jax.jobs import prepare
from test_reliability import RUN, TINY, cli, error_line
from test_sources import save

# One shard per split (the demo's 8 train patches), so "record 1" names a record in shard 0.
SHARD = "shard-00000.tfrecord"


@pytest.fixture
def prepared(tmp_path):
  """Demo records for TINY, written in-process (prepare needs no JAX): about a second."""
  workdir = tmp_path / "w"
  prepare.run(load_config("demo", **TINY), str(workdir))
  return workdir


# ---- data errors ----

def test_a_corrupt_record_stops_training_naming_the_shard_and_record(prepared):
  shard = prepared / "data" / "train" / SHARD
  offsets = np.fromfile(f"{shard}.index", dtype="<u8")
  data = bytearray(shard.read_bytes())
  data[int(offsets[1]) + 100] ^= 0xFF  # inside record 1's payload
  shard.write_bytes(bytes(data))
  line = error_line(cli("train_diffusion", prepared, TINY, timeout=300))
  assert line.endswith(f"{shard}: record 1: data CRC mismatch (corrupt record)"), line
  assert not (prepared / "checkpoints" / RUN / "2").exists()


def test_a_truncated_shard_stops_training_naming_the_shard_and_record(prepared):
  shard = prepared / "data" / "train" / SHARD
  shard.write_bytes(shard.read_bytes()[:-10])  # the last record loses its tail
  line = error_line(cli("train_diffusion", prepared, TINY, timeout=300))
  assert f"{shard}: record 7: truncated (" in line, line


def _folder_source(root, mask_values=(0, 1, 2), mask_size=(24, 24)):
  """A `folder` source of three scenes (train, val and test hold one each); scene s1's mask draws from
  mask_values at mask_size."""
  rng = np.random.default_rng(0)
  for stem in ("s1", "s2", "s3"):
    save(root / "images" / f"{stem}.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    values, size = (mask_values, mask_size) if stem == "s1" else ((0, 1, 2), (24, 24))
    save(root / "masks" / f"{stem}.png", rng.choice(np.asarray(values, np.uint8), size))
  return {"data.format": "folder", "data.source_dir": str(root), "data.num_classes": 3,
          "data.class_names": "('a','b','c')", "data.palette": "((0,0,0),(9,9,9),(99,99,99))",
          "data.patch_size": 12, "data.val_fraction": 0.5, "data.test_fraction": 0.34}


def test_a_mask_with_out_of_range_classes_stops_prepare_naming_the_file_and_values(tmp_path):
  overrides = _folder_source(tmp_path / "src", mask_values=(0, 1, 7))
  line = error_line(cli("prepare", tmp_path / "w", overrides, config="default", timeout=120))
  assert str(tmp_path / "src" / "masks" / "s1.png") in line and "7: " in line, line
  # The split holding s1 never records "complete" (the other may, when written first).
  assert not all((tmp_path / "w" / "data" / split / "manifest.json").exists() for split in ("train", "val", "test"))


def test_image_and_mask_of_different_sizes_stop_prepare_naming_both_files(tmp_path):
  overrides = _folder_source(tmp_path / "src", mask_size=(24, 20))
  line = error_line(cli("prepare", tmp_path / "w", overrides, config="default", timeout=120))
  assert f"image {tmp_path / 'src' / 'images' / 's1.png'} is 24x24" in line, line
  assert f"{tmp_path / 'src' / 'masks' / 's1.png'} is 20x24" in line, line


# ---- checkpoint errors ----

@pytest.mark.parametrize("mode, run", [("sample", RUN), ("evaluate", "fpn_r0_s0"),
                                       ("train_segmentation", None)])
def test_a_missing_checkpoint_or_set_names_the_folder_and_the_mode_that_makes_it(prepared, mode, run):
  if run is None:  # R=1 needs G's synthetic set: its absence is named
    line = error_line(cli(mode, prepared, {**TINY, "data.synthetic_ratio": 1}, timeout=300))
    assert f"synthetic set {prepared / 'synthetic' / RUN}, which does not exist; run --mode=sample first" in line, line
    return
  line = error_line(cli(mode, prepared, TINY, timeout=300))
  made_by = "train_diffusion" if mode == "sample" else "train_segmentation"
  assert line.endswith(f"no checkpoint in {prepared / 'checkpoints' / run}: run --mode={made_by} first"), line


# Damaged checkpoints through the CLI: test_reliability.py (sample and train_diffusion, with and
# without --allow_checkpoint_fallback).


# ---- a diverging run ----

def test_a_nan_loss_stops_before_saving_and_names_the_newest_checkpoint(prepared):
  # lr 1e30: step 2's loss is still finite (saved), then an update overflows and a later step's loss is NaN.
  diverging = {**TINY, "diffusion.train.lr": 1e30, "diffusion.train.log_every": 1}
  line = error_line(cli("train_diffusion", prepared, diverging, timeout=300))
  assert f"{RUN}: non-finite metrics at step " in line and "stopped without saving" in line, line
  assert "This run started fresh" in line
  assert f"its newest checkpoint is step 2 in {prepared / 'checkpoints' / RUN}" in line
  assert "Lower train.lr or raise train.warmup_steps" in line
  assert checkpoint.latest_step(layout.checkpoint_dir(str(prepared), RUN)) == 2
  logged = [json.loads(l)["step"] for l in (prepared / "metrics" / f"{RUN}.jsonl").read_text().splitlines()]
  assert all(step < int(line.split("at step ")[1].split(":")[0]) for step in logged), logged


# ---- SIGTERM ----

# Measured on the 2 shared cores under load: start-up and compile 10-20 s, then ~0.1 s a step of
# this one-level U-Net. 2000 steps (minutes) cannot finish before the signal lands.
SIGTERM_STEPS = 2000
START_TIMEOUT_S = 240  # start-up under heavy load, 10x the measured worst case


def test_sigterm_saves_a_complete_checkpoint_exits_in_one_line_and_the_rerun_resumes(prepared):
  overrides = {**TINY, "diffusion.train.num_steps": SIGTERM_STEPS, "diffusion.train.log_every": 1,
               "diffusion.train.checkpoint_every": SIGTERM_STEPS}
  cmd = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py", *paper_method_flags(), "--mode=train_diffusion",
         f"--workdir={prepared}", *(config_flag(k, v) for k, v in overrides.items())]
  env = cpu_env(devices=1)
  metrics = prepared / "metrics" / f"{RUN}.jsonl"
  with open(prepared.parent / "stderr.log", "w+") as err:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
      deadline = time.monotonic() + START_TIMEOUT_S
      while not (metrics.exists() and metrics.read_text().strip()):  # the loop is running
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=START_TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    err.seek(0)
    result = subprocess.CompletedProcess(cmd, proc.returncode, "", err.read())
  line = error_line(result)
  prefix = f"satsynth_jax: error: {RUN}: SIGTERM at step "
  assert line.startswith(prefix), line
  step = int(line.removeprefix(prefix).split(";")[0])
  assert 0 < step < SIGTERM_STEPS
  assert line.endswith(f"checkpoint saved in {prepared / 'checkpoints' / RUN}. Re-run the same command to resume.")
  assert checkpoint.latest_step(layout.checkpoint_dir(str(prepared), RUN)) == step
  # The saved step is complete: the rerun restores (and verifies) it and trains on to the end.
  resumed = cli("train_diffusion", prepared, {**overrides, "diffusion.train.num_steps": step + 2}, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"{RUN}: resumed from step {step} (" in resumed.stderr
  assert checkpoint.latest_step(layout.checkpoint_dir(str(prepared), RUN)) == step + 2


# ---- bad settings (more in test_cli.py and test_reliability.py) ----

@pytest.mark.parametrize("mode, flag, expected", [
    ("train_segmentation", config_flag("segmentation.architecture", "vit"), "config.segmentation.architecture='vit'"),
    ("evaluate", config_flag("segmentation.eval_batch_size", 0), "config.segmentation.eval_batch_size=0"),
    ("experiment", config_flag("experiment.seeds", 0), "config.experiment.seeds=0"),
    ("sample", "--distributed=maybe", "--distributed"),
])
def test_bad_settings_of_other_modes_fail_in_one_line_before_writing(tmp_path, mode, flag, expected):
  line = error_line(cli(mode, tmp_path / "w", {}, flag, timeout=120))
  assert expected in line, line
  assert not (tmp_path / "w").exists()
