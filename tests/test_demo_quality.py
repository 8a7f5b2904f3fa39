"""The demo generator learns: after a short CPU run its masks are coherent and real-like, not noise."""

import numpy as np

from conftest import load_config
from satsynth_jax import parallel
from satsynth_jax.data import prepare, records
from satsynth_jax.train import diffusion

import jax


def _neighbour_agreement(masks: np.ndarray) -> float:
  """Share of horizontally and vertically adjacent pixels with the same class (noise: ~sum p_k^2)."""
  same = [(masks[:, :, 1:] == masks[:, :, :-1]).mean(), (masks[:, 1:] == masks[:, :-1]).mean()]
  return float(np.mean(same))


def test_demo_samples_have_real_like_class_structure(tmp_path):
  config = load_config("demo", **{
      "data.image_size": 16, "data.patch_size": 32, "data.demo_num_scenes": 8,
      "train.num_steps": 400, "train.checkpoint_every": 400, "train.sample_every": 0,
  })
  workdir = str(tmp_path)
  prepare.run(config, workdir)
  state = diffusion.run(config, workdir)
  mesh = parallel.make_mesh()
  generate = diffusion.make_generate_fn(config, diffusion.make_model(config), mesh, 64, sampler="ddim", ddim_steps=50)
  with jax.set_mesh(mesh):
    _, masks = diffusion.decode_samples(config, parallel.to_host(generate(state.eval_params, jax.random.key(7))))

  k = config.data.num_classes
  real = np.asarray(records.read_manifest(f"{workdir}/data/train")["class_pixels"], np.float64)
  real /= real.sum()
  fake = np.bincount(masks.ravel(), minlength=k) / masks.size
  noise_agreement = float((fake**2).sum())  # what independent pixels with these shares would give
  assert (fake > 0.01).sum() >= 2, fake  # not blank
  assert 0.5 * np.abs(fake - real).sum() < 0.35, (fake, real)  # total variation from the real shares
  assert _neighbour_agreement(masks) > max(0.75, noise_agreement + 0.2), (_neighbour_agreement(masks), fake)
