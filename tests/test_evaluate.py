"""--mode=evaluate: every test and val example counted once (padding never), standard JSON, report PNG, table."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_SEGMENTER, load_config, prepared_demo
from satsynth_jax import resolved, segmenter
from satsynth_jax.data import records
from satsynth_jax.infra import checkpoint, identity, report, workdir as layout
from satsynth_jax.jobs import evaluate
from satsynth_jax.train import segmentation
from test_train_segmentation import random_variables

DEMO_NAMES = load_config("demo").data.class_names
# The demo has no background class; naming class 0 so exercises the scores without it.
NAMES = ("background", *DEMO_NAMES[1:])
# 2 val scenes of 32 px -> 8 patches of 16 px: one batch of 12 holds them and 4 padding rows; 4 test
# scenes -> 16 patches: two batches, the second with 8 padding rows.
TINY = {**TINY_SEGMENTER, "data.class_names": NAMES, "data.background_index": 0, "segmentation.eval_batch_size": 12}
SIZE = 16
NUM_EXAMPLES = {"val": 8, "test": 16}
STEP = 5


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A segmenter with random weights saved as step 5 of its run, then evaluated (on all 4 devices)."""
  config, workdir = prepared_demo(tmp_path_factory, "eval", TINY)
  run = resolved.SegmenterRun.from_config(config)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(segmenter, "init_variables", lambda model, size, rng: random_variables(model, SIZE, 0))
    state = segmentation.init_state(segmenter.build(config, "unet"), SIZE, config.segmentation.train,
                                    jax.random.key(0))
  directory = layout.checkpoint_dir(workdir, run.name)
  identity.record(directory, config, segmenter.shaping(config, run, None, workdir))  # as training records it
  mngr = checkpoint.manager(directory)
  checkpoint.save(mngr, STEP, state)
  mngr.wait_until_finished()
  scores = evaluate.run(config, workdir)
  return config, workdir, scores


def _reject_nan(constant):
  raise ValueError(f"non-standard JSON constant {constant}")


def test_json_holds_the_run_and_standard_scores(evaluated):
  config, workdir, scores = evaluated
  text = open(os.path.join(workdir, "metrics", "eval_unet_r0_s0.json")).read()
  summary = json.loads(text, parse_constant=_reject_nan)
  keys = ("run", "architecture", "synthetic_ratio", "seed", "checkpoint_step", "background_index")
  assert {k: summary[k] for k in keys} == {"run": "unet_r0_s0", "architecture": "unet", "synthetic_ratio": 0,
                                            "seed": 0, "checkpoint_step": STEP, "background_index": 0}
  assert summary["class_names"] == list(NAMES)
  # The settings the run recorded: a score is never read under other settings (experiment, summary).
  assert summary["settings"] == identity.read(layout.checkpoint_dir(workdir, "unet_r0_s0"))["shaping"]
  assert summary["settings"]["segmentation.base_width"] == config.segmentation.base_width
  assert list(summary["splits"]) == ["test", "val"]
  for split, split_scores in scores.items():
    saved = summary["splits"][split]["scores"]
    assert {"miou", "mf1", "miou_no_background", "mf1_no_background", "pixel_accuracy"} <= saved.keys()
    for name in NAMES:
      for metric in ("iou", "f1"):
        value = split_scores[f"{metric}/{name}"]
        assert saved[f"{metric}/{name}"] == (None if math.isnan(value) else value)
  assert scores["test"]["miou"] != scores["val"]["miou"]  # two splits, scored apart


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_held_out_example_counts_once_and_padding_never(evaluated, split):
  _, workdir, _ = evaluated
  summary = json.load(open(os.path.join(workdir, "metrics", "eval_unet_r0_s0.json")))["splits"][split]
  manifest = records.read_manifest(os.path.join(workdir, "data", split))
  assert manifest["num_examples"] == NUM_EXAMPLES[split] and summary["num_examples"] == NUM_EXAMPLES[split]
  # Patches are at model size, so the matrix holds exactly the labelled pixels of the split.
  assert np.asarray(summary["confusion_matrix"]).sum() == sum(manifest["class_pixels"])


def test_a_score_under_other_settings_is_refused_and_a_stale_one_is_not_current(evaluated):
  config, workdir, _ = evaluated
  run = resolved.SegmenterRun.from_config(config)
  assert evaluate.is_current(workdir, run, STEP)
  assert not evaluate.is_current(workdir, run, STEP + 1)  # a newer checkpoint: score again
  other = config.copy_and_resolve_references()
  other.data.image_size = 8
  with pytest.raises(identity.SettingsMismatchError, match=r"input_size: 16 -> 8"):
    evaluate.run(other, workdir)  # evaluated at another size than trained: refused, nothing written
  assert evaluate.is_current(workdir, run, STEP)


def test_report_png_is_written(evaluated):
  _, workdir, _ = evaluated
  with Image.open(os.path.join(workdir, "report", "eval_unet_r0_s0.png")) as picture:
    assert picture.mode == "RGB"
    assert picture.width >= 600 and picture.height >= 4 * report.PREVIEW_TILE  # 4 rows of 2 examples + chart


class _ColourCoded(nn.Module):
  """Predicts class round(255 * red) at every pixel: a stand-in whose answers a test knows."""

  num_classes: int

  def __call__(self, images, train):
    return jax.nn.one_hot(jnp.round(images[..., 0] * 255).astype(jnp.int32), self.num_classes)


def test_eval_step_counts_only_valid_rows():
  mask = np.zeros((3, 4, 4), np.int32)
  mask[:, :, 2:] = 1
  mask[0, 0, 0] = 255  # no-data
  image = np.zeros((3, 4, 4, 3), np.float32)
  image[0, ..., 0] = 1 / 255  # row 0: everything predicted 1; rows 1 and 2: everything 0
  batch = {"image": image, "mask": mask, "valid": np.array([True, True, False])}  # row 2 pads the batch
  confusion, count, preds = segmenter.eval_step({}, batch, model=_ColourCoded(3), num_classes=3, ignore_index=255)
  assert int(count) == 2
  np.testing.assert_array_equal(confusion, [[8, 7, 0], [8, 8, 0], [0, 0, 0]])
  assert preds.shape == (3, 4, 4)


@pytest.mark.parametrize("config_name,expected", [("isaid", 0), ("loveda", None), ("openearthmap", None), ("demo", None)])
def test_background_is_set_per_dataset_not_guessed_from_class_names(config_name, expected):
  # LoveDA's class 0 is called "background" but is a real land-cover class: it stays in every mean.
  assert segmenter.background_index(load_config(config_name)) == expected


def test_score_table_lists_classes_and_means():
  scores = {"iou/a": 0.5, "f1/a": 2 / 3, "iou/b": float("nan"), "f1/b": float("nan"), "miou": 0.5, "mf1": 2 / 3}
  lines = report.score_table(scores, ["a", "b"]).splitlines()
  assert lines[1].split() == ["a", "50.00", "66.67"]
  assert lines[2].split() == ["b", "n/a", "n/a"]
  assert lines[3].split() == ["mean", "50.00", "66.67"]


def test_a_split_heading_counts_its_scenes_in_words():
  one = report._split_heading("val", {"num_examples": 16, "num_scenes": 1, "split_notes": ["val: 1 of 7 held out"]})
  assert one == "## Val split: 16 patches from 1 scene (settings (budgets, generator levers) were chosen here; 1 of 7 held out)"
  assert "from 3 scenes (" in report._split_heading("test", {"num_examples": 48, "num_scenes": 3})
