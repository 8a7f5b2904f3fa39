"""The demo generator learns within a CPU budget: its masks are coherent and real-like, not noise."""

import jax
import numpy as np
import pytest

from conftest import load_config
from satsynth_jax import generator
from satsynth_jax.data import records
from satsynth_jax.infra import parallel
from satsynth_jax.jobs import prepare
from satsynth_jax.train import diffusion, loop


def _neighbour_agreement(masks: np.ndarray) -> float:
  """Share of horizontally and vertically adjacent pixels with the same class."""
  return float(np.mean([(masks[:, :, 1:] == masks[:, :, :-1]).mean(), (masks[:, 1:] == masks[:, :-1]).mean()]))


@pytest.mark.slow
def test_demo_samples_have_real_like_class_structure(tmp_path):
  # The demo config at 16 px on one device (4 virtual CPU devices would only add overhead).
  config = load_config("demo", **{"data.image_size": 16, "data.patch_size": 32, "data.demo_num_scenes": 8,
                                  "diffusion.train.num_steps": 500, "diffusion.train.checkpoint_every": 500, "diffusion.train.sample_every": 0})
  workdir = str(tmp_path)
  prepare.run(config, workdir)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = loop.train(diffusion.make_task(config, workdir, mesh), config.diffusion.train, workdir, seed=0, mesh=mesh)
  generate = generator.make_generate_fn(config, generator.build_g(config), mesh, 64, sampler="ddim", ddim_steps=50)
  with jax.set_mesh(mesh):
    _, masks = generator.decode_samples(config, parallel.to_host(generate(state.eval_params, jax.random.key(7))),
                                        np.random.default_rng(0))

  real = np.asarray(records.read_manifest(f"{workdir}/data/train")["class_pixels"], np.float64)
  real /= real.sum()
  fake = np.bincount(masks.ravel(), minlength=config.data.num_classes) / masks.size
  assert (fake > 0.005).sum() >= 2, fake  # not blank
  assert 0.5 * np.abs(fake - real).sum() < 0.35, (fake, real)  # total variation from the real class shares
  # Independent pixels with these shares would agree with a neighbour sum_k p_k^2 of the time.
  chance = float((fake**2).sum())
  assert _neighbour_agreement(masks) > chance + 0.5 * (1 - chance), (_neighbour_agreement(masks), chance)
