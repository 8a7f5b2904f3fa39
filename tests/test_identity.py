"""Run identity: runs record their config, ablations get their own names, other settings are refused."""

import json

import numpy as np
import pytest

from conftest import load_config
from satsynth_jax import generator, labels, resolved
from satsynth_jax.data import pipeline
from satsynth_jax.infra import identity


def test_record_then_check_names_each_differing_key_with_both_values(tmp_path):
  config = load_config("demo")
  shaping = identity.select(config, ["diffusion.model", "data.image_size"])
  assert shaping["diffusion.model.ch_mult"] == [1, 2, 2] and shaping["data.image_size"] == 32
  assert identity.check(tmp_path, shaping, "G", "fix it") is False  # nothing recorded yet
  identity.record(tmp_path, config, shaping)
  assert identity.check(tmp_path, shaping, "G", "fix it") is True
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["config"]["diffusion.prediction"] == "x0" and recorded["shaping"] == shaping
  wider = {**shaping, "diffusion.model.ch": 64, "data.image_size": 64}
  with pytest.raises(identity.SettingsMismatchError) as error:
    identity.check(tmp_path, wider, "G", "fix it")
  message = str(error.value)
  assert "\n" not in message and message.endswith("; fix it")
  assert "data.image_size: 32 -> 64" in message and "diffusion.model.ch: 32 -> 64" in message


def test_recorded_config_round_trips_to_a_config_that_builds_the_same_model(tmp_path):
  config = load_config("demo", **{"diffusion.model.ch": 64, "diffusion.model.ch_mult": (1, 2)})
  identity.record(tmp_path, config, {})
  recorded = identity.recorded_config(tmp_path)
  assert recorded.diffusion.model.ch_mult == (1, 2) and recorded.diffusion.model.ch == 64
  assert generator.build_g(recorded) == generator.build_g(config)
  assert generator.joint_channels(recorded) == generator.joint_channels(config)


@pytest.mark.parametrize("overrides,name", [
    ({"diffusion.prediction": "eps"}, "diffusion"),
    ({"diffusion.prediction": "x0"}, "diffusion_x0"),
    ({"diffusion.prediction": "eps", "data.label_encoding": "onehot"}, "diffusion_onehot"),
    ({"diffusion.prediction": "x0", "data.label_encoding": "onehot"}, "diffusion_x0_onehot"),
    ({"diffusion.prediction": "eps", "diffusion.joint_labels": False}, "diffusion_image_only"),
])
def test_the_papers_ablations_get_their_own_runs_sets_and_segmenter_runs(overrides, name):
  config = load_config("demo", **overrides)
  assert resolved.g_run(config) == name
  assert resolved.sr_run(config) == name.replace("diffusion", "super_resolution")
  assert resolved.synthetic_set(config) == name
  config.sample.super_resolve = True
  assert resolved.synthetic_set(config) == f"{name}_cascade"
  run = resolved.SegmenterRun.arm(config, 3, 1, resolved.synthetic_set(config))
  assert run.name == f"fpn_r3_{name}_cascade_s1"
  assert resolved.SegmenterRun.arm(config, 0, 1, None).name == "fpn_r0_s1"  # real only: no generator in its name


def test_shaping_ignores_logging_cadence_and_length_but_not_what_changes_the_weights():
  base = load_config("demo")
  longer = load_config("demo", **{"diffusion.train.num_steps": 10_000, "diffusion.train.log_every": 7,
                                  "diffusion.train.checkpoint_every": 9})
  assert generator.g_shaping(base) == generator.g_shaping(longer)
  for key, value in (("diffusion.train.lr", 5e-4), ("diffusion.model.ch", 64), ("data.image_size", 64),
                     ("data.no_data_code", True), ("diffusion.timesteps", 500)):
    assert generator.g_shaping(load_config("demo", **{key: value})) != generator.g_shaping(base), key


def test_no_data_gets_its_own_code_in_gs_input_and_decodes_back_to_no_data():
  config = load_config("loveda", **{"data.image_size": 8})  # K = 7: the spare bit code means no-data
  assert config.data.no_data_code and generator.joint_channels(config) == 3 + 3
  rng = np.random.default_rng(0)
  mask = rng.integers(0, 7, (8, 8)).astype(np.uint8)
  mask[:2] = 255
  example = {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "mask": mask}
  joint = pipeline._diffusion_example(example, num_classes=7, encoding="bits", ignore_index=255,
                                      no_data_code=True, fill_class=0)["x"]
  np.testing.assert_array_equal(joint[:2, :, 3:], 1.0)  # code 7 = (1, 1, 1): not a class
  _, decoded = generator.decode_samples(config, joint[None], np.random.default_rng(1))
  np.testing.assert_array_equal(decoded[0], mask)  # no-data comes back as no-data, classes as classes
  # The paper's codec (no_data_code=False) fills no-data with a class instead.
  filled = pipeline._diffusion_example(example, num_classes=7, encoding="bits", ignore_index=255,
                                       no_data_code=False, fill_class=0)["x"]
  assert (labels.decode_signed(filled[:2, :, 3:], 7) == 0).all()


def test_isaid_keeps_the_papers_seven_channels_and_the_background_exclusion():
  config = load_config("isaid")
  assert generator.joint_channels(config) == 7 and config.data.background_index == 0
  loveda = load_config("loveda")
  assert loveda.data.background_index == -1  # LoveDA's class 0 is land cover, not "everything else"
