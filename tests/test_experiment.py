"""--mode=experiment: a shrunken demo runs every stage, writes the comparison table, and resumes."""

import json
import math
import re
import shutil
import statistics

import pytest

from conftest import TINY_EXPERIMENT, load_config, run_main

SHRUNK = {
    **TINY_EXPERIMENT, "data.demo_num_scenes": 2, "data.demo_scene_size": 64, "data.patch_size": 32,
    "diffusion.train.num_steps": 4, "diffusion.train.log_every": 2, "diffusion.train.checkpoint_every": 4,
    "sample.ddim_steps": 5, "segmentation.train.num_steps": 4, "segmentation.train.log_every": 2,
    "segmentation.train.checkpoint_every": 4, "segmentation.eval_every": 1, "experiment.seeds": 2,
    # A 4-step scorer disagrees with most generated pixels: keep every pair, so curation always has enough.
    "curation.min_fidelity": 0.0,
}
ARMS = {"D": ("unet_r0_s0", "unet_r0_s1"),  # the demo generator predicts x0
        "D u D' (`diffusion_x0`)": ("unet_r1_diffusion_x0_s0", "unet_r1_diffusion_x0_s1"),
        "D u D'_curated (`diffusion_x0_curated`)": ("unet_r1_diffusion_x0_curated_s0", "unet_r1_diffusion_x0_curated_s1")}
RUNS = tuple(run for runs in ARMS.values() for run in runs)
# prepare, G, sample D', its evaluate_samples, curate + its scores, train + evaluate per run: the cpu
# preset scores sets with D's first run (sample_quality.encoder=real_only), so no metric encoder trains.
STAGES = 4 + 2 + 2 * len(RUNS)


def tables(summary: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
  """The comparison table under each split heading: (header cells, {arm label: row cells})."""
  out, split = {}, None
  for line in summary.splitlines():
    if line.startswith("## "):
      heading = re.match(r"## (Test|Val) split", line)
      split = heading and heading.group(1).lower()
    elif split and line.startswith("| train on"):
      out[split] = ([cell.strip() for cell in line.strip().strip("|").split("|")], {})
    elif split in out and line.startswith("| D"):
      cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
      out[split][1][cells[0]] = cells
  return out


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
  names = [line.split("] ", 1)[1].removesuffix(": running") for line in stages]
  # The set is scored once its encoder, D's first run, has trained and been evaluated.
  assert names.index("evaluate_samples D'") > names.index("evaluate unet_r0_s1") > names.index("sample D'")
  assert "train_metric_encoder" not in names
  summary = (workdir / "report" / "summary.md").read_text()
  by_split = tables(summary)
  assert list(by_split) == ["test", "val"]  # the claim's split first, each under a heading naming it
  assert "## Test split: 16 patches from 4 scenes (claims are made here; no setting was ever chosen on it)" in summary
  assert "## Val split: 8 patches from 2 scenes (settings (budgets, generator levers) were chosen here)" in summary
  keys = {"mIoU": "miou", "mF1": "mf1", **{f"IoU {n}": f"iou/{n}" for n in load_config("demo").data.class_names}}
  for split, (header, rows) in by_split.items():
    assert set(rows) == set(ARMS)
    assert header[:5] == ["train on", "R", "seeds", "mIoU", "mIoU vs D"] and set(header[5:]) == set(keys) - {"mIoU"}
    evals = {label: [json.loads((workdir / "metrics" / f"eval_{run}.json").read_text())["splits"][split]["scores"]
                     for run in runs] for label, runs in ARMS.items()}
    # Every score column: mean ± standard error over the seeds, recomputed from the eval JSONs.
    for label, scores in evals.items():
      cells = rows[label]
      assert cells[1] == ("0" if label == "D" else "1") and cells[2] == "2"
      for column, cell in zip(header, cells):
        if column not in keys:
          continue
        values = [s[keys[column]] for s in scores if s.get(keys[column]) is not None]  # null: class absent
        if len(values) < 2:
          assert cell == (f"{100 * values[0]:.2f}" if values else "n/a"), (label, column, cell)
          continue
        mean = statistics.mean(values)
        stderr = statistics.stdev(values) / math.sqrt(len(values))
        assert cell == f"{100 * mean:.2f} ± {100 * stderr:.2f}", (label, column, cell, values)
      if label != "D":  # the difference to D and its standard error (independent seeds)
        mine, base = [s["miou"] for s in scores], [s["miou"] for s in evals["D"]]
        diff = statistics.mean(mine) - statistics.mean(base)
        se = math.sqrt(statistics.variance(mine) / 2 + statistics.variance(base) / 2)
        assert cells[4].startswith(f"{100 * diff:+.2f} ± {100 * se:.2f}"), (label, cells[4])
  curated = json.loads((workdir / "synthetic" / "diffusion_x0_curated" / "manifest.json").read_text())
  assert curated["num_examples"] == json.loads((workdir / "data" / "train" / "manifest.json").read_text())["num_examples"]
  assert curated["pool_size"] == 2 * curated["num_examples"]
  assert "mIoU w/o bg" not in summary  # the demo has no background class
  assert "| `diffusion_x0` |" in summary and "| `diffusion_x0_curated` |" in summary and "`unet_r0_s0@4:" in summary
  assert "Other segmenter runs" not in summary
  assert "## Convergence" in summary and "Every arm trains for the same 4 steps" in summary
  # D's mean val curve, and its change over the last fifth (steps 3-4), from the logs
  val = {run: {r["step"]: r["val_miou"] for r in map(json.loads, (workdir / "metrics" / f"{run}.jsonl").read_text()
                                                       .splitlines()) if "val_miou" in r} for run in ARMS["D"]}
  change = statistics.mean(v[4] for v in val.values()) - statistics.mean(v[3] for v in val.values())
  assert f"changed by {100 * change:+.2f} points over the last fifth of training (steps 3-4)" in summary
  assert (workdir / "report" / "val_curves.png").exists()
  assert "Stage times" in summary and "train_diffusion" in summary
  for png in ("report/eval_unet_r0_s0.png", f"report/eval_{RUNS[3]}.png", "samples/synthetic_grid.png",
              "report/training_curves_generator.png", "report/training_curves_segmenters.png",
              "report/class_frequency_real_vs_synthetic.png", "report/prepare_train.png", "report/prepare_test.png",
              "report/class_frequency_diffusion_x0.png"):
    assert (workdir / png).exists(), png


def test_a_finished_experiment_reruns_nothing_and_rewrites_the_same_summary(finished):
  workdir, _ = finished
  summary = (workdir / "report" / "summary.md").read_text()
  again = _experiment(workdir)
  assert again.count("complete, skipped") == STAGES, again
  assert (workdir / "report" / "summary.md").read_text() == summary


def test_an_interrupted_experiment_reruns_only_its_missing_and_stale_stages(finished, tmp_path):
  """A lost eval JSON is redone, and so is one scored at another checkpoint step (stale); every other
  stage is reported complete and its outputs are left untouched."""
  done, _ = finished
  workdir = tmp_path / "experiment"
  shutil.copytree(done, workdir)  # copy2 keeps mtimes: an untouched file keeps its st_mtime_ns
  summary = (workdir / "report" / "summary.md").read_text()
  lost, stale = RUNS[1], RUNS[2]
  (workdir / "metrics" / f"eval_{lost}.json").unlink()
  stale_path = workdir / "metrics" / f"eval_{stale}.json"
  row = json.loads(stale_path.read_text())
  row["splits"]["test"]["scores"]["miou"] = 0.0
  stale_path.write_text(json.dumps({**row, "checkpoint_step": 2}))
  kept = {path: path.stat().st_mtime_ns for pattern in ("metrics/eval_*.json", "checkpoints/*/*/_CHECKPOINT_METADATA",
                                                         "synthetic/*/manifest.json", "data/*/manifest.json")
          for path in workdir.glob(pattern) if path != stale_path}
  assert len(kept) > len(RUNS)

  out = _experiment(workdir)
  ran = [line.split("] ", 1)[1].removesuffix(": running") for line in out.splitlines()
         if line.startswith("[experiment ") and line.endswith(": running")]
  assert sorted(ran) == sorted([f"evaluate {lost}", f"evaluate {stale}"]), out
  assert out.count("complete, skipped") == STAGES - 2, out
  assert {path: path.stat().st_mtime_ns for path in kept} == kept
  for run in (lost, stale):
    assert json.loads((workdir / "metrics" / f"eval_{run}.json").read_text())["checkpoint_step"] == 4
  def table(text):  # the comparison rows: stage times change with the rerun, scores must not
    return tables(text)

  assert table((workdir / "report" / "summary.md").read_text()) == table(summary) != {}


def test_the_cascade_experiment_trains_g_sr_before_sampling_and_sizes_the_segmenter_to_it(tmp_path):
  from conftest import load_config
  from satsynth_jax import config_check
  from satsynth_jax.jobs import experiment

  config = load_config("demo", **{"sample.super_resolve": True, "sr.image_size": 64})
  with pytest.raises(config_check.ConfigError, match=r"segmentation.image_size=0: .*synthetic pairs are 64 px"):
    config_check.validate(config, mode="experiment")
  config.segmentation.image_size = 64
  config_check.validate(config, mode="experiment")
  names = [stage.name for stage in experiment.stages(config, tmp_path)]
  assert names[:3] == ["prepare", "train_diffusion", "train_sr"] and names.index("sample D'") == 3
  assert "train_segmentation fpn_r2_diffusion_x0_cascade_s0" in names


@pytest.mark.parametrize("encoder, scorer", [("metric_encoder", "real_only"), ("real_only", "metric_encoder"),
                                             ("real_only", "real_only")])
def test_the_metric_encoder_trains_only_for_a_judge_that_is_it_and_sets_are_scored_after_their_encoder(
    tmp_path, encoder, scorer):
  from satsynth_jax.jobs import experiment
  config = load_config("demo", **{"sample_quality.encoder": encoder, "curation.scorer": scorer,
                                  "experiment.arms": ("raw", "curated")})
  names = [stage.name for stage in experiment.stages(config, tmp_path)]
  scores = [names.index("evaluate_samples D'")]
  assert ("train_metric_encoder" in names) == ("metric_encoder" in (encoder, scorer))
  if encoder == "metric_encoder":  # scored as soon as sampled, before any segmenter trains
    assert names.index("train_metric_encoder") < names.index("sample D'")
    assert max(scores) < names.index("train_segmentation fpn_r0_s0")
  else:  # scored by D's first run: after D's runs, before the synthetic arms train
    assert min(scores) > names.index(f"evaluate fpn_r0_s{config.experiment.seeds - 1}")
    assert max(scores) < min(i for i, name in enumerate(names) if name.startswith("train_segmentation fpn_r2"))
  assert names.index("evaluate_samples D'_curated") > names.index("curate D'")


def test_with_data_synthetic_dir_every_stage_samples_curates_scores_and_trains_on_that_one_folder(tmp_path,
                                                                                                   monkeypatch):
  """The experiment's stages and the single modes agree on the set: its folder and its runs' names."""
  from conftest import load_config
  from satsynth_jax import resolved
  from satsynth_jax.jobs import curate, experiment, sample, sample_quality, train_segmentation

  folder = str(tmp_path / "elsewhere" / "my_set")
  config = load_config("demo", **{"data.synthetic_dir": folder, "segmentation.architecture": "unet",
                                  "experiment.seeds": 2, "sample.per_real": 1})
  seen = []  # (job or run, the synthetic folder it would read or write)

  def saw(job, folder):
    seen.append((job, folder and str(folder)))

  monkeypatch.setattr(sample, "run", lambda c, w: saw("sample", resolved.synthetic_dir(c, w)))
  monkeypatch.setattr(curate, "curate_set", lambda c, w, pool, out, scorer: saw("curate", pool))
  monkeypatch.setattr(sample_quality, "run_for", lambda c, w, directory, name: saw("score", directory))
  monkeypatch.setattr(train_segmentation, "train_run", lambda c, w, run, synthetic: saw(run.name, synthetic))
  for stage in experiment.stages(config, tmp_path):
    if stage.name.split()[0] in ("sample", "curate", "evaluate_samples", "train_segmentation"):
      stage.run()
  curated = str(resolved.curated_dir(config, tmp_path))
  assert curated == str(tmp_path / "synthetic" / "my_set_curated")
  assert seen == [("sample", folder), ("unet_r0_s0", None), ("unet_r0_s1", None), ("score", folder),
                  ("curate", folder), ("score", curated),
                  ("unet_r1_my_set_s0", folder), ("unet_r1_my_set_s1", folder),
                  ("unet_r1_my_set_curated_s0", curated), ("unet_r1_my_set_curated_s1", curated)]
  # The single modes, on the same config: the same folder, the same run names.
  seen.clear()
  sample.run(config, tmp_path)
  curate.run(config, tmp_path)
  mixed = config.copy_and_resolve_references()
  mixed.data.synthetic_ratio = 1
  train_segmentation.run(mixed, tmp_path)
  assert seen == [("sample", folder), ("curate", folder), ("unet_r1_my_set_s0", folder)]
  assert resolved.SegmenterRun.from_config(mixed).name == "unet_r1_my_set_s0"


@pytest.mark.parametrize("overrides", [{"experiment.arms": ("raw", "conditioned"), "diffusion.condition": "presence"},
                                       {"experiment.image_only_baseline": True}])
def test_data_synthetic_dir_is_refused_when_the_experiment_samples_two_sets(overrides):
  from conftest import load_config
  from satsynth_jax import config_check

  config = load_config("demo", **{"data.synthetic_dir": "/sets/mine", **overrides})
  config_check.validate(config)  # one set at a time outside the experiment
  with pytest.raises(config_check.ConfigError, match=r"data.synthetic_dir='/sets/mine': names one folder, but "):
    config_check.validate(config, mode="experiment")


@pytest.mark.parametrize("mode", ["sample", "train_segmentation", "curate", "evaluate", "train_diffusion"])
def test_what_the_arms_need_binds_only_the_experiment(mode):
  """A user who curates nothing, or samples with an unconditioned G, is not refused over arms no job of
  theirs runs; the experiment is."""
  from conftest import load_config
  from satsynth_jax import config_check

  uncurated = load_config("demo", **{"curation.enabled": False, "experiment.arms": ("raw", "curated")})
  unconditioned = load_config("demo", **{"experiment.arms": ("raw", "conditioned")})
  for config in (uncurated, unconditioned):
    if mode != "curate" or config is unconditioned:
      config_check.validate(config, mode=mode)
  with pytest.raises(config_check.ConfigError, match=r"curation.enabled=False: is False but experiment.arms"):
    config_check.validate(uncurated, mode="experiment")
  with pytest.raises(config_check.ConfigError, match=r"experiment.arms=.*need a class-presence conditioned G"):
    config_check.validate(unconditioned, mode="experiment")


def test_the_shipped_demo_trains_a_conditioned_class_weighted_g_and_reports_every_arm(tmp_path):
  """The demo as shipped (presence-conditioned G with a class-weighted loss, the raw and curated arms),
  shrunk, with the conditioned arm added: every set comes from the one G, the conditioned one asked with
  the real train pairs' classes under guidance 1, and the summary reports each arm and set."""
  shipped = load_config("demo", shipped=True)
  assert (shipped.diffusion.condition, shipped.diffusion.class_weight_power, tuple(shipped.experiment.arms)) == (
      "presence", 0.5, ("raw", "curated"))
  shrunk = {**SHRUNK, "experiment.seeds": 1, "experiment.arms": ("raw", "curated", "conditioned")}
  out = run_main("experiment", tmp_path, shrunk, shipped=True)
  assert "curate D'" in out
  summary = (tmp_path / "report" / "summary.md").read_text()
  rows = tables(summary)["test"][1]
  assert set(rows) == {"D", "D u D' (`diffusion_x0_presence`)", "D u D'_curated (`diffusion_x0_presence_curated`)",
                       "D u D'_conditioned (`diffusion_x0_presence_real_w1`)"}
  g = json.loads((tmp_path / "checkpoints" / "diffusion_x0_presence" / "config.json").read_text())["shaping"]
  assert g["diffusion.class_weight_power"] == 0.5 and g["diffusion.condition"] == "presence"
  conditioned = tmp_path / "synthetic" / "diffusion_x0_presence_real_w1"
  plan = json.loads((conditioned / "config.json").read_text())["shaping"]["presence_plan"]
  assert plan == {"presence": "real", "require_classes": [], "guidance": 1.0}
  quality = json.loads((tmp_path / "metrics" / "sample_quality_diffusion_x0_presence_real_w1.json").read_text())
  assert set(quality["presence_accuracy"]) <= set(shipped.data.class_names) and quality["class_tv"] is not None
  assert "| `diffusion_x0_presence_real_w1` |" in summary and "| `diffusion_x0_presence_curated` |" in summary


def test_the_compile_clock_counts_overlapping_compiles_once(monkeypatch):
  """Stage times report the wall time something compiled: a step compiled beside init counts once."""
  from satsynth_jax.jobs import experiment
  clock = experiment._CompileClock  # pylint: disable=protected-access
  monkeypatch.setattr(clock, "_intervals", [(5.0, 8.0), (2.0, 4.0), (6.0, 7.0), (3.5, 9.0), (11.0, 12.0)])
  # Intervals after 3.0: [3, 4] u [3.5, 9] u [11, 12] = 1 + 5 + 1 s; the sum of durations would say 11.
  assert clock.seconds_since(3.0) == pytest.approx(7.0)
  assert clock.seconds_since(9.5) == pytest.approx(1.0)  # and it forgets what ended before a stage began
  assert clock._intervals == [(11.0, 12.0)]  # pylint: disable=protected-access
