"""After --mode=prepare, every mode runs from the workdir alone: the prepared records and the settings
their manifests record are the source of truth, so data.source_dir is needed only to prepare (and by
an experiment that still has to). A download reached through a symlink or `..` is the same source."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_EXPERIMENT, config_flag, cpu_env, load_config, paper_method_flags
from satsynth_jax import config_check
from satsynth_jax.main import MODES
from test_reliability import error_line
from test_sources import save

CLASSES = {"data.format": "folder", "data.num_classes": 3, "data.class_names": "('a','b','c')",
           "data.palette": "((0,0,0),(9,9,9),(99,99,99))"}
# The smallest experiment on 16 px patches of 32 px scenes, each model trained for 2 steps.
TINY = {
    **TINY_EXPERIMENT, **CLASSES, "data.patch_size": 16, "data.read_threads": 1,
    "diffusion.train.num_steps": 2, "diffusion.train.log_every": 1, "diffusion.train.checkpoint_every": 2,
    "sample.ddim_steps": 2, "segmentation.train.num_steps": 2, "segmentation.train.log_every": 1,
    "segmentation.train.checkpoint_every": 2, "experiment.seeds": 1, "experiment.arms": ("raw",),
    "curation.enabled": False,
}


def cli(mode, workdir, overrides):
  """The CLI as a user runs it (the cpu preset, one CPU device); the CompletedProcess."""
  cmd = [sys.executable, "-m", "satsynth_jax.main", "--config=configs/default.py:cpu", *paper_method_flags(overrides), f"--mode={mode}",
         f"--workdir={workdir}", *(config_flag(k, v) for k, v in overrides.items())]
  return subprocess.run(cmd, cwd=REPO, env=cpu_env(devices=1), capture_output=True, text=True, timeout=600)


def ok(mode, workdir, overrides=None) -> str:
  result = cli(mode, workdir, {**TINY, **(overrides or {})})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def write_download(root, seed: int = 0) -> None:
  """A folder-format download: train (2 scenes), val and test (1 each) of 32 px index masks."""
  rng = np.random.default_rng(seed)
  for split, stems in {"train": ("t1", "t2"), "val": ("v1",), "test": ("e1",)}.items():
    for stem in stems:
      save(root / split / "images" / f"{stem}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
      save(root / split / "masks" / f"{stem}.png", rng.integers(0, 3, (32, 32)).astype(np.uint8))


@pytest.fixture(scope="module")
def download(tmp_path_factory):
  root = tmp_path_factory.mktemp("downloads")
  write_download(root / "src")
  (root / "link").symlink_to(root / "src", target_is_directory=True)
  return root


@pytest.fixture(scope="module")
def workdir(download, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("work")
  ok("prepare", workdir, {"data.source_dir": download / "src"})
  return workdir


def test_every_mode_but_prepare_passes_the_config_check_without_a_source():
  config = load_config("default", **{"data.format": "folder"})
  for mode in MODES:
    if mode != "prepare":
      config_check.validate(config, mode=mode)
  with pytest.raises(config_check.ConfigError, match=r"^config\.data\.source_dir='': is empty: .*folder download"):
    config_check.validate(config, mode="prepare")


def test_the_manifest_records_the_downloads_real_path(download, tmp_path):
  ok("prepare", tmp_path / "w", {"data.source_dir": f"{download / 'link'}/../link"})
  manifest = json.loads((tmp_path / "w" / "data" / "train" / "manifest.json").read_text())
  assert manifest["settings"]["data.source_dir"] == str((download / "src").resolve())


def test_a_rerun_through_a_symlink_or_dotdot_is_the_same_source(download, workdir):
  for spelling in (download / "link", f"{download / 'src'}/../link"):
    assert "(already prepared, skipped)" in ok("prepare", workdir, {"data.source_dir": spelling})


def test_a_manifest_from_before_real_paths_names_the_same_source_through_its_symlink(download, tmp_path):
  ok("prepare", tmp_path, {"data.source_dir": download / "src"})
  for manifest in tmp_path.glob("data/*/manifest.json"):  # as recorded before: the path as spelled
    recorded = json.loads(manifest.read_text())
    recorded["settings"]["data.source_dir"] = str(download / "link")
    manifest.write_text(json.dumps(recorded))
  assert "(already prepared, skipped)" in ok("prepare", tmp_path, {"data.source_dir": download / "src"})


def test_another_source_is_refused_in_one_line_naming_both_paths(download, workdir, tmp_path):
  write_download(tmp_path / "other", seed=1)
  line = error_line(cli("prepare", workdir, {**TINY, "data.source_dir": tmp_path / "other"}))
  assert "prepared with other settings: data.source_dir" in line, line
  assert json.dumps(str((download / "src").resolve())) in line and json.dumps(str(tmp_path.resolve() / "other")) in line


def test_an_experiment_that_has_to_prepare_asks_for_the_source_in_one_line(tmp_path):
  line = error_line(cli("experiment", tmp_path / "w", TINY))
  assert "config.data.source_dir='': is empty: preparing the workdir's data reads the folder download" in line, line


def test_every_mode_runs_from_the_prepared_workdir_alone(download, workdir):
  ok("train_diffusion", workdir)
  ok("sample", workdir)
  # A model whose config named the download (another spelling) is the same model to later jobs without it.
  ok("train_segmentation", workdir, {"data.source_dir": download / "link"})
  ok("evaluate", workdir)
  out = ok("experiment", workdir)
  for stage in ("prepare", "train_diffusion", "sample D'", "train_segmentation unet_r0_s0", "evaluate unet_r0_s0"):
    assert f"] {stage}: complete, skipped" in out, out  # what the modes made is this experiment's own
  assert (workdir / "report" / "summary.md").is_file()
  ok("export", workdir, {"export.set": "train"})
  assert os.listdir(workdir / "export")
