"""Every setting that shapes a run or a set is in its identity, so a change is refused, never reused.

Each sweep walks every key of the resolved config (keys added later are swept without editing this
file) and changes its value. A key passes when the change gives another run or set name, changes
the recorded shaping (so infra/identity.py refuses the resumed run or treats the set as not done), or is
refused by --mode=prepare / the experiment's prepared check. Otherwise it must be listed below with
the reason it shapes nothing of that kind; a key left out of an identity (diffusion.beta_end of G,
sample.ddim_eta of the sample plan, ...) fails its sweep, naming it.
"""

import json
import re

import pytest

from conftest import TINY_G, load_config
from satsynth_jax import generator, resolved, segmenter
from satsynth_jax.data import splits
from satsynth_jax.infra import identity
from satsynth_jax.jobs import prepare, sample

# ---- what each identity may leave out, and why ----

# Sections no model's training reads; G_SR's and the segmenter's sections below are per identity.
NOT_TRAINING = {"preset": "only picks defaults; the values it sets are swept themselves",
                "sample.": "sampling (the sample plan's sweep)", "curation.": "curation (curate.py's identity)",
                "experiment.": "which stages run", "export.": "an export's folder",
                "sample_quality.": "scoring a set (its JSON names the encoder's run and weights)"}
NOT_LEARNED = {"data.class_names": "names, also recorded in the prepared settings",
               "data.palette": "preview colours (and rgb masks' codes, recorded in the prepared settings)",
               "data.background_index": "which class the 'w/o background' scores leave out",
               "data.read_threads": "input threads", "data.max_image_pixels": "a guard: refuses, never changes",
               "data.examples_per_shard": "shard layout: the same pairs in the same order",
               "data.synthetic_ratio": "the segmenter's", "data.synthetic_dir": "the segmenter's",
               "data.synthetic_fraction": "the segmenter's"}
CADENCE = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "num_grid_samples",
           "grid_sampler_steps")  # length and logging; a resumed run may extend them


def _cadence(section: str) -> dict:
  return {f"{section}.{key}": "run length or logging cadence" for key in CADENCE}


G_FREE = {**NOT_TRAINING, **NOT_LEARNED, **_cadence("diffusion.train"), "sr.": "G_SR's",
          "segmentation.": "the segmenter's"}
SR_FREE = {**NOT_TRAINING, **NOT_LEARNED, **_cadence("sr.train"), "diffusion.train.": "G's training",
           "diffusion.class_weight_power": "G's loss only: G_SR weighs every pixel alike",
           "segmentation.": "the segmenter's"}
SEGMENTER_FREE = {**NOT_TRAINING, **{k: v for k, v in NOT_LEARNED.items() if not k.startswith("data.synthetic")},
                  **_cadence("segmentation.train"),
                  "diffusion.": "G's: an R > 0 run meets it through its set's recorded identity",
                  "sr.": "G_SR's: likewise through the set",
                  "data.label_encoding": "G's label code", "data.no_data_code": "G's label code",
                  "data.ignore_fill_class": "G's label code",
                  "segmentation.eval_batch_size": "evaluation batching", "segmentation.eval_every": "val logging",
                  "segmentation.resize_synthetic": "only lets a run on mis-sized pairs start instead of refusing"}
PLAN_FREE = {"preset": NOT_TRAINING["preset"],
             "data.": "sampling decodes with G's recorded config, which the plan's generator_settings carry",
             "diffusion.": "G's recorded config (generator_settings; G's own sweep)",
             "sr.": "G_SR's recorded config (super_resolution_settings)",
             "segmentation.": "the segmenter's", "experiment.": NOT_TRAINING["experiment."],
             "export.": NOT_TRAINING["export."], "sample_quality.": NOT_TRAINING["sample_quality."],
             "curation.min_fidelity": "curate.py's", "curation.pixel_tolerance": "curate.py's",
             "curation.scorer": "curate.py's", "curation.selection": "curate.py's",
             "sample.batch_size": "batching: the same distribution of pairs",
             "sample.checkpoint_step": "resolved into the plan's checkpoint_step",
             "sample.sr_checkpoint_step": "resolved into the plan's super_resolution_step",
             "dtype": "sampling computes in G's recorded dtype (generator_settings)"}
PREPARE_FREE = {**NOT_TRAINING,
                **{k: v for k, v in NOT_LEARNED.items() if k not in ("data.class_names", "data.palette")},
                "dtype": "models only", "seed": "models and samples only: splits and demo scenes have their own seeds",
                **{key: "models only" for key in ("diffusion.", "sr.", "segmentation.", "data.resize", "data.augment")},
                "data.image_size": "models only: records keep the patch size", "data.label_encoding": "G only",
                "data.no_data_code": "G only", "data.ignore_fill_class": "G only",
                "data.ignore_index": "config_check refuses any value but the records' no-data value"}

FOLDER_RGB = {"data.format": "folder", "data.source_dir": "/src", "data.mask_format": "rgb"}


def changed(value):
  """Another value of the same type (ConfigDict keeps its fields' types)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 0.5
  if isinstance(value, str):
    return value + "_other"
  if isinstance(value, (tuple, list)):
    return tuple(value) + (value[-1],) if value else (1,)
  raise TypeError(f"no other value for {value!r}")


def _with(base: dict, key: str):
  config = load_config("demo", **base)
  node = config
  *parents, leaf = key.split(".")
  for parent in parents:
    node = node[parent]
  node[leaf] = changed(node[leaf])
  return config


def _free(key: str, free: dict) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in free)


def _prepared_keys() -> set[str]:
  """Config keys a prepared split records: --mode=prepare and prepare.is_complete refuse a change."""
  return {key for base in ({}, FOLDER_RGB) for key in splits.split_settings(load_config("demo", **base))}


def _uncovered(cases, free: dict, also_covered: set[str] = frozenset()) -> list[str]:
  """Config keys that change no case's identity (cases: (overrides, ident(config))), are not `free` and
  not `also_covered`."""
  missing = []
  for key in identity.flatten(load_config("demo")):
    if _free(key, free) or key in also_covered:
      continue
    if all(ident(_with(base, key)) == ident(load_config("demo", **base)) for base, ident in cases):
      missing.append(key)
  return missing


def _assert_covered(*args) -> None:
  missing = _uncovered(*args)
  assert not missing, f"settings that shape it but change no identity (or list them as free, saying why): {missing}"


def _refused(ident_shaping, base: dict, key: str, tmp_path) -> None:
  """The shaping recorded for `base` refuses the config with `key` changed, naming what differs."""
  recorded = tmp_path / key
  identity.record(recorded, load_config("demo", **base), ident_shaping(load_config("demo", **base)))
  with pytest.raises(identity.SettingsMismatchError, match=" -> "):
    identity.check(recorded, ident_shaping(_with(base, key)), "it", "remedy")


# ---- the sweeps ----

def _g(config):
  return resolved.g_run(config), generator.g_shaping(config)


def _sr(config):
  return resolved.sr_run(config), generator.sr_shaping(config)


def test_every_setting_that_shapes_g_is_in_its_identity(tmp_path):
  _assert_covered([({}, _g)], G_FREE, _prepared_keys())
  for key in identity.select(load_config("demo"), generator.G_SHAPING):  # each listed key reaches the refusal
    if resolved.g_run(_with({}, key)) == resolved.g_run(load_config("demo")):
      _refused(generator.g_shaping, {}, key, tmp_path)


def test_every_setting_that_shapes_g_sr_is_in_its_identity(tmp_path):
  _assert_covered([({}, _sr)], SR_FREE, _prepared_keys())
  for key in identity.select(load_config("demo"), generator.SR_SHAPING):
    if resolved.sr_run(_with({}, key)) == resolved.sr_run(load_config("demo")):
      _refused(generator.sr_shaping, {}, key, tmp_path)


SET_IDENTITY = {"generator": "diffusion_x0", "checkpoint_step": 4}  # an R > 0 run's set, as recorded


def _segmenter(config):
  run = resolved.SegmenterRun.from_config(config)
  return run.name, segmenter.shaping(config, run, SET_IDENTITY if run.synthetic_ratio else None)


def test_every_setting_that_shapes_a_segmenter_run_is_in_its_identity(tmp_path):
  cases = [({}, _segmenter), ({"data.synthetic_ratio": 1}, _segmenter)]  # D; D u D' (synthetic_fraction)
  _assert_covered(cases, SEGMENTER_FREE, _prepared_keys())
  for key in identity.select(load_config("demo"), segmenter.SHAPING):
    _refused(lambda config: _segmenter(config)[1], {}, key, tmp_path)


def _plan(base: dict):
  """A set's identity (its name and sample.plan) under `base`, G and G_SR recorded with `base`'s config."""
  recorded = load_config("demo", **base)
  cascade = recorded.sample.super_resolve

  def ident(config):
    return resolved.synthetic_set(config), sample.plan(config, recorded, 8, 4, 2 if cascade else None,
                                                        recorded if cascade else None)

  return ident


def test_every_sampling_setting_is_in_the_sample_plan():
  """ddim_eta, sampler, ddim_steps, seed, per_real, ...: each changes the set's name or its plan under G,
  the cascade, or a presence-conditioned G (whose plan alone reads sample.presence and guidance)."""
  # Guidance reads only in a conditional plan (an unconditional one samples at 0 whatever it says).
  bases = [{}, {"sample.super_resolve": True}, {"diffusion.condition": "presence"},
           {"diffusion.condition": "presence", "sample.presence": "real"}]
  _assert_covered([(base, _plan(base)) for base in bases], PLAN_FREE)


def test_a_changed_sampling_setting_makes_a_finished_set_not_done(tmp_path):
  ident = _plan({})
  recorded = tmp_path / "set"
  identity.record(recorded, load_config("demo"), ident(load_config("demo"))[1])
  for key in ("sample.ddim_eta", "sample.sampler", "sample.ddim_steps", "seed", "sample.per_real"):
    with pytest.raises(identity.SettingsMismatchError, match=" -> "):
      identity.check(recorded, ident(_with({}, key))[1], "this synthetic set", "remedy")


def test_every_setting_that_shapes_prepared_records_is_recorded_in_their_manifest():
  cases = [({}, splits.split_settings), (FOLDER_RGB, splits.split_settings)]  # the demo; a download
  _assert_covered(cases, PREPARE_FREE)


# ---- the prepared data each model records ----

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("prepared")
  prepare.run(load_config("demo", **TINY_G), str(workdir))
  return workdir


def test_every_prepared_setting_is_refused_by_the_prepared_check(prepared):
  config = load_config("demo", **TINY_G)
  assert prepare.is_complete(config, prepared)
  recorded = splits.recorded_settings(json.loads((prepared / "data" / "train" / "manifest.json").read_text()))
  assert {"data.patch_size", "data.num_classes", "data.max_no_data_fraction"} <= set(recorded)
  for key in recorded:
    with pytest.raises(splits.PrepareError, match=key.replace(".", r"\.")):
      prepare.is_complete(_with(TINY_G, key), prepared)


IDENTITIES = {"G": generator.g_shaping, "G_SR": generator.sr_shaping,
              "segmenter": lambda config, workdir: segmenter.shaping(
                  config, resolved.SegmenterRun.from_config(config), None, workdir)}


@pytest.mark.parametrize("name", IDENTITIES)
def test_every_prepared_setting_and_the_data_itself_are_in_each_models_identity(prepared, tmp_path, name):
  """Data prepared again under other settings (or from other files) refuses a run trained on the old."""
  shaping = IDENTITIES[name]
  config = load_config("demo", **TINY_G)
  directory = tmp_path / "run"
  identity.record(directory, config, shaping(config, prepared))
  path = prepared / "data" / "train" / "manifest.json"
  original = path.read_text()
  try:
    for key in [*json.loads(original)["settings"], "class_pixels"]:  # other pixels: other source files
      edited = json.loads(original)
      node = edited if key == "class_pixels" else edited["settings"]
      node[key] = changed(node[key])
      path.write_text(json.dumps(edited))
      named = "train_split.digest" if key == "class_pixels" else f"train_split.{key}"
      with pytest.raises(identity.SettingsMismatchError, match=re.escape(f"{named}: ")):
        identity.check(directory, shaping(config, prepared), "it", "remedy")
  finally:
    path.write_text(original)
