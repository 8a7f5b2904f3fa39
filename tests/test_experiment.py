"""--mode=pipeline: a shrunken demo runs every stage, writes the comparison table, and resumes."""

from conftest import run_main

SHRUNK = {
    "data.demo_num_scenes": 2, "data.demo_scene_size": 64, "data.patch_size": 32, "data.image_size": 16,
    "model.ch_mult": "(1,2)", "model.attn_resolutions": "(8,)", "diffusion.timesteps": 50,
    "train.batch_size": 8, "train.num_steps": 4, "train.warmup_steps": 1, "train.log_every": 2,
    "train.checkpoint_every": 4, "train.sample_every": 0, "sample.per_real": 1, "sample.ddim_steps": 5,
    "sample.batch_size": 8, "sample.examples_per_shard": 8, "segmentation.model": "unet",
    "segmentation.train.batch_size": 4, "segmentation.train.num_steps": 4, "segmentation.train.warmup_steps": 1,
    "segmentation.train.log_every": 2, "segmentation.train.checkpoint_every": 4, "segmentation.eval_batch_size": 8,
}


def _pipeline(workdir) -> str:
  return run_main("pipeline", workdir, SHRUNK)


def test_pipeline_runs_every_stage_writes_the_table_and_skips_finished_stages(tmp_path):
  out = _pipeline(tmp_path)
  stages = [line for line in out.splitlines() if line.startswith("[pipeline ") and line.endswith(": running")]
  assert len(stages) == 9, out  # prepare .. evaluate fpn_r1
  summary = (tmp_path / "report" / "summary.md").read_text()
  assert "| D | 0 |" in summary and "| D u D' | 1 |" in summary
  assert "| joint image + mask (SatSynth) |" in summary and "metric_encoder@4:" in summary
  for png in ("report/eval_unet_r0.png", "report/eval_unet_r1.png", "samples/synthetic_grid.png",
              "report/class_frequency_real_vs_synthetic.png", "report/prepare_train.png"):
    assert (tmp_path / png).exists(), png

  again = _pipeline(tmp_path)  # everything is complete: nothing reruns
  assert again.count("complete, skipped") == 9, again
  assert (tmp_path / "report" / "summary.md").read_text() == summary
