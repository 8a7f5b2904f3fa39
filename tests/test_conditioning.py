"""A class-presence conditioned G end to end: it learns to draw what it is asked for, records its plan,
and is never taken for an unconditioned G (or the other way round)."""

import json
import os

import numpy as np
import pytest

from conftest import TINY_G, prepared_demo
from satsynth_jax import config_check, labels, presence, resolved
from satsynth_jax.data import records
from satsynth_jax.infra import checkpoint, workdir as layout
from satsynth_jax.jobs import sample, sample_quality, train_diffusion

ASKED = "water"
# 600 steps on the 8 train pairs of TINY_G's two scenes (3 hold water): about 30 s on 2 cores.
TINY = {
    **TINY_G, "diffusion.train.num_steps": 600, "diffusion.train.warmup_steps": 20, "diffusion.train.lr": 2e-3,
    "diffusion.train.log_every": 100, "diffusion.train.checkpoint_every": 600, "diffusion.train.sample_every": 0,
    "diffusion.train.ema_decay": 0.99, "diffusion.condition": "presence", "diffusion.model.scale_shift": True,
    "curation.enabled": False,
    "sample.per_real": 8, "sample.sampler": "ddim", "sample.ddim_steps": 10, "sample.batch_size": 64,
    "sample.examples_per_shard": 64,
}


def _masks(directory) -> np.ndarray:
  source = records.PairSource(directory)
  try:
    return np.stack([source[i]["mask"] for i in range(len(source))])
  finally:
    source.close()


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
  config, workdir = prepared_demo(tmp_path_factory, "conditioned", TINY)
  train_diffusion.run(config, workdir)
  return config, workdir


def test_a_conditioned_g_draws_a_requested_class_more_often_than_unconditioned(conditioned):
  config, workdir = conditioned
  water = list(config.data.class_names).index(ASKED)
  real = records.read_manifest(layout.data_dir(workdir, "train"))
  assert 0 < sample.train_vectors(config, layout.data_dir(workdir, "train"))[:, water].mean() < 0.75
  assert real["num_examples"] == 8
  unconditional = config.copy_and_resolve_references()
  asked = config.copy_and_resolve_references()
  asked.sample.presence, asked.sample.require_classes, asked.sample.guidance = "real", (ASKED,), 3.0
  for c in (unconditional, asked):
    sample.run(c, workdir)
  plain_dir, asked_dir = (resolved.synthetic_dir(c, workdir) for c in (unconditional, asked))
  assert os.path.basename(plain_dir) == "diffusion_x0_presence"
  assert os.path.basename(asked_dir) == "diffusion_x0_presence_real-water_w3"
  plain, wanted = _masks(plain_dir), _masks(asked_dir)
  holding = [float(np.mean(labels.presence(m, 6)[:, water])) for m in (plain, wanted)]
  # Unconditional samples hold water about as often as the train pairs do (3 of 8); asked, far more often,
  # and with twice the water pixels.
  assert holding[1] > holding[0] + 0.15, holding
  assert np.mean(wanted == water) > 2 * np.mean(plain == water)
  # The set records its plan and the requests, so its presence accuracy is measured against them.
  recorded = json.loads(open(os.path.join(asked_dir, "config.json")).read())["shaping"]
  assert recorded["presence_plan"] == {"presence": "real", "require_classes": [ASKED], "guidance": 3.0}
  requests = np.load(os.path.join(asked_dir, presence.REQUESTS_FILE))
  assert requests.shape == (64, 6) and requests[:, water].all()
  stats = sample_quality.label_statistics(config, real, asked_dir)
  assert stats["presence_accuracy"][ASKED] == pytest.approx(holding[1])
  assert set(stats["class_frequency"]) == {"real", "synthetic"} and 0 <= stats["class_tv"] <= 1
  assert sample_quality.label_statistics(config, real, plain_dir)["presence_accuracy"] is None


def test_conditioned_and_unconditioned_generators_are_never_taken_for_each_other(conditioned):
  config, workdir = conditioned
  plain = config.copy_and_resolve_references()
  plain.diffusion.condition = "none"
  assert resolved.g_run(plain) == "diffusion_x0" != resolved.g_run(config) == "diffusion_x0_presence"
  with pytest.raises(checkpoint.CheckpointNotFoundError, match="diffusion_x0_presence"):
    sample.run(plain, workdir)  # only the conditioned G exists: named in the hint, never used unconditioned
  asking = plain.copy_and_resolve_references()
  asking.sample.presence = "rare"
  with pytest.raises(config_check.ConfigError, match=r"sample.presence='rare': .*diffusion.condition=presence"):
    config_check.validate(asking)
  no_dropout = config.copy_and_resolve_references()
  no_dropout.diffusion.condition_dropout, no_dropout.sample.presence, no_dropout.sample.guidance = 0.0, "real", 1.0
  with pytest.raises(config_check.ConfigError, match=r"sample.guidance=1.0: .*condition_dropout"):
    config_check.validate(no_dropout)
  bad = config.copy_and_resolve_references()
  bad.sample.presence, bad.sample.require_classes = "real", ("lava",)
  with pytest.raises(config_check.ConfigError, match=r"sample.require_classes=\('lava',\)"):
    config_check.validate(bad)


def test_an_unconditional_plan_samples_without_guidance_whatever_sample_guidance_says():
  """Guidance mixes the conditional and the null prediction; under the null condition they are one,
  so an unconditional set of a conditioned G is the same set at any scale (and costs one pass a step)."""
  from conftest import load_config

  config = load_config("demo", **{"diffusion.condition": "presence", "sample.guidance": 2.0})
  assert resolved.guidance(config) == 0.0 and resolved.synthetic_set(config) == "diffusion_x0_presence"
  assert sample.presence_plan(config, config)["guidance"] == 0.0
  config.sample.presence = "real"
  assert resolved.guidance(config) == 2.0 and resolved.synthetic_set(config) == "diffusion_x0_presence_real_w2"
  assert sample.presence_plan(config, config)["guidance"] == 2.0
