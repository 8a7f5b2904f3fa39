"""--mode=experiment: a shrunken demo runs every stage, writes the comparison table, and resumes."""

import json

import pytest

from conftest import run_main

SHRUNK = {
    "data.demo_num_scenes": 2, "data.demo_scene_size": 64, "data.patch_size": 32, "data.image_size": 16,
    "diffusion.model.ch_mult": "(1,2)", "diffusion.model.attn_resolutions": "(8,)", "diffusion.timesteps": 50,
    "diffusion.train.batch_size": 8, "diffusion.train.num_steps": 4, "diffusion.train.warmup_steps": 1,
    "diffusion.train.log_every": 2, "diffusion.train.checkpoint_every": 4, "diffusion.train.sample_every": 0,
    "sample.per_real": 1, "sample.ddim_steps": 5, "sample.batch_size": 8, "sample.examples_per_shard": 8,
    "segmentation.architecture": "unet", "segmentation.train.batch_size": 4, "segmentation.train.num_steps": 4,
    "segmentation.train.warmup_steps": 1, "segmentation.train.log_every": 2,
    "segmentation.train.checkpoint_every": 4, "segmentation.eval_batch_size": 8, "experiment.seeds": 2,
    # A 4-step scorer disagrees with most generated pixels: keep every pair, so curation always has enough.
    "curation.min_fidelity": 0.0,
}
ARMS = {"D": ("unet_r0_s0", "unet_r0_s1"),  # the demo generator predicts x0
        "D u D' (diffusion_x0)": ("unet_r1_diffusion_x0_s0", "unet_r1_diffusion_x0_s1"),
        "D u D' (diffusion_x0_curated)": ("unet_r1_diffusion_x0_curated_s0", "unet_r1_diffusion_x0_curated_s1")}
RUNS = tuple(run for runs in ARMS.values() for run in runs)
STAGES = 5 + 2 + 2 * len(RUNS)  # prepare .. evaluate_samples, curate + its scores, train + evaluate per run


def _experiment(workdir) -> str:
  return run_main("experiment", workdir, SHRUNK)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("experiment")
  return workdir, _experiment(workdir)


def test_experiment_runs_every_stage_and_writes_the_table_from_the_eval_jsons(finished):
  workdir, out = finished
  stages = [line for line in out.splitlines() if line.startswith("[experiment ") and line.endswith(": running")]
  assert len(stages) == STAGES, out
  summary = (workdir / "report" / "summary.md").read_text()
  rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| D")}
  assert set(rows) == set(ARMS)
  # mean ± standard error over the two seeds, recomputed from the eval JSONs.
  for label, runs in ARMS.items():
    mious = [json.loads((workdir / "metrics" / f"eval_{run}.json").read_text())["scores"]["miou"] for run in runs]
    mean = sum(mious) / 2
    stderr = abs(mious[0] - mious[1]) / 2  # sample std / sqrt(2) for n = 2
    cells = rows[label].split(" | ")
    assert cells[1] == ("0" if label == "D" else "1") and cells[2] == "2"
    assert cells[3] == f"{100 * mean:.2f} ± {100 * stderr:.2f}", (cells, mious)
  curated = json.loads((workdir / "synthetic" / "diffusion_x0_curated" / "manifest.json").read_text())
  assert curated["num_examples"] == json.loads((workdir / "data" / "train" / "manifest.json").read_text())["num_examples"]
  assert curated["pool_size"] == 2 * curated["num_examples"]
  assert "mIoU w/o bg" not in summary  # the demo has no background class
  assert "| `diffusion_x0` |" in summary and "| `diffusion_x0_curated` |" in summary and "metric_encoder@4:" in summary
  assert "Other segmenter runs" not in summary
  assert "Stage times" in summary and "train_diffusion" in summary
  for png in ("report/eval_unet_r0_s0.png", f"report/eval_{RUNS[3]}.png", "samples/synthetic_grid.png",
              "report/training_curves_generator.png", "report/training_curves_segmenters.png",
              "report/class_frequency_real_vs_synthetic.png", "report/prepare_train.png"):
    assert (workdir / png).exists(), png


def test_a_finished_experiment_reruns_nothing_and_rewrites_the_same_summary(finished):
  workdir, _ = finished
  summary = (workdir / "report" / "summary.md").read_text()
  again = _experiment(workdir)
  assert again.count("complete, skipped") == STAGES, again
  assert (workdir / "report" / "summary.md").read_text() == summary


def test_the_cascade_experiment_trains_g_sr_before_sampling_and_sizes_the_segmenter_to_it(tmp_path):
  from conftest import load_config
  from satsynth_jax import config_check, experiment

  config = load_config("demo", **{"sample.super_resolve": True, "sr.image_size": 64})
  with pytest.raises(config_check.ConfigError, match=r"segmentation.image_size=0: .*synthetic pairs are 64 px"):
    config_check.validate(config, mode="experiment")
  config.segmentation.image_size = 64
  config_check.validate(config, mode="experiment")
  names = [stage.name for stage in experiment.stages(config, tmp_path)]
  assert names[:4] == ["prepare", "train_diffusion", "train_sr", "sample"]
  assert "train_segmentation fpn_r2_diffusion_x0_cascade_s0" in names
