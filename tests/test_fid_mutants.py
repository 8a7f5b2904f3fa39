"""FID/IS edge cases pinned after tools/mutation/mutation.sh: float64 throughout, boundaries, error names."""

import numpy as np
import pytest
import scipy.linalg

from satsynth_jax.metrics import fid


def test_frechet_distance_of_float32_statistics_is_computed_in_float64():
  # Near-identical Gaussians: d^2 is tiny beside tr(S1) + tr(S2), so float32 traces or a float32
  # eigendecomposition would swamp it with rounding.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(16, 16))
  s1 = (a @ a.T + 100.0 * np.eye(16)).astype(np.float32)
  s2 = (s1 + 1e-3 * np.eye(16, dtype=np.float32)).astype(np.float32)
  mu1 = rng.normal(size=16).astype(np.float32)
  mu2 = (mu1 + np.float32(1e-3)).astype(np.float32)
  m1, m2, c1, c2 = (np.asarray(v, np.float64) for v in (mu1, mu2, s1, s2))
  want = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(want, rel=1e-6, abs=1e-10)


def test_frechet_distance_errors_name_the_argument():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match="mu2 has shape"):
    fid.frechet_distance(mu, sigma, np.zeros(4), sigma)
  with pytest.raises(ValueError, match="sigma1 has shape"):
    fid.frechet_distance(mu, np.eye(4), mu, sigma)
  with pytest.raises(ValueError, match="sigma1 holds non-finite"):
    fid.frechet_distance(mu, np.full((3, 3), np.nan), mu, sigma)
  with pytest.raises(ValueError, match="mu1 holds non-finite"):
    fid.frechet_distance(np.full(3, np.inf), sigma, mu, sigma)


def test_moments_need_two_rows_and_name_a_bad_batch():
  moments = fid.RunningMoments()
  with pytest.raises(ValueError, match="at least 2 feature vectors, got 0"):
    moments.statistics()
  moments.update(np.array([[1.0, 2.0], [3.0, 6.0]]))
  mean, cov = moments.statistics()  # exactly two rows suffice
  np.testing.assert_allclose(mean, [2.0, 4.0])
  np.testing.assert_allclose(cov, [[2.0, 4.0], [4.0, 8.0]])
  with pytest.raises(ValueError, match="feature batch must be"):
    moments.update(np.zeros(3))


def test_accumulator_without_valid_keeps_every_row_and_casts_valid_to_bool():
  rng = np.random.default_rng(1)
  feats = {"pooled": rng.normal(size=(3, 4)), "spatial": rng.normal(size=(3, 5)),
           "probs": np.full((3, 2), 0.5, np.float32)}
  acc = fid.FeatureAccumulator()
  acc.update(feats)
  acc.update(feats, valid=[1, 0, 1])  # 0/1 flags mean keep/drop, not row indices
  assert acc.count == 5
  probs = acc.probs()
  assert probs.dtype == np.float64 and probs.shape == (5, 2)
  mean, _ = acc.statistics("pooled")
  np.testing.assert_allclose(mean, (feats["pooled"].sum(0) + feats["pooled"][[0, 2]].sum(0)) / 5)


def test_inception_score_defaults_to_ten_splits_and_allows_one_image_per_split():
  rng = np.random.default_rng(2)
  p = rng.dirichlet(np.ones(4) * 0.3, size=20)
  assert fid.inception_score(p) == fid.inception_score(p, splits=10)
  assert fid.inception_score(p) != fid.inception_score(p, splits=11)
  mean, std = fid.inception_score(p, splits=20)  # one image per split: each scores exp(0) = 1
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_accepts_float32_rounding_in_row_sums():
  p = np.full((4, 3), 1 / 3) + np.array([5e-5, 0.0, 0.0])  # rows sum to 1 + 5e-5 (float32 softmax)
  assert fid.inception_score(p, splits=2)[0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="probs must be"):
    fid.inception_score(np.ones(3))
