"""FID / sFID / IS math against float64 SciPy references and closed forms; segmenter features."""

import functools

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from satsynth_jax.metrics import fid
from satsynth_jax.models.unet_seg import UNetSegmenter



def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, unbiased covariance) of [N, D] features through the streaming accumulator, in one batch."""
  moments = fid.RunningMoments()
  moments.update(features)
  return moments.statistics()

def _random_covariance(rng, dim, rank=None):
  factor = rng.standard_normal((dim, rank or dim))
  return factor @ factor.T / (rank or dim)


def _scipy_frechet(mu1, sigma1, mu2, sigma2):
  """The textbook formula with SciPy's general matrix square root of S1 S2 (float64)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---- Fréchet distance ----


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
  rng = np.random.default_rng(dim)
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
  want = _scipy_frechet(mu1, sigma1, mu2, sigma2)
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
  assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(got, rel=1e-9)  # symmetric


def test_frechet_distance_of_a_set_to_itself_is_zero_and_shifts_add_the_squared_offset():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32)) + 3.0
  mu, sigma = statistics(features)
  assert fid.frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)
  shift = rng.standard_normal(32)
  assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-7)


def test_rank_deficient_covariances_from_fewer_samples_than_dims():
  # 12 samples in 64 dims: rank-11 covariances, where sqrtm(S1 S2) is ill-posed.
  rng = np.random.default_rng(1)
  mu_a, sigma_a = statistics(rng.standard_normal((12, 64)))
  mu_b, sigma_b = statistics(rng.standard_normal((12, 64)) * 2.0)
  assert np.linalg.matrix_rank(sigma_a) == 11
  assert fid.frechet_distance(mu_a, sigma_a, mu_a, sigma_a) < 1e-9 * np.trace(sigma_a)
  value = fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
  assert np.isfinite(value) and value > 0


def test_rank_deficient_covariances_against_the_commuting_closed_form():
  # With shared eigenvectors, tr sqrt(S1^1/2 S2 S1^1/2) = sum_i sqrt(a_i b_i), so
  # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, zero eigenvalues included.
  rng = np.random.default_rng(2)
  dim = 40
  basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  a[:15] = 0.0  # rank 25
  b[10:25] = 0.0  # rank 25, a different null space
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma1, sigma2 = (basis * a) @ basis.T, (basis * b) @ basis.T
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(want, rel=1e-7)


def test_sampled_gaussians_score_the_population_distance_within_sampling_error():
  # Features drawn from N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T), streamed in batches. The
  # population distance has the closed form |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  # Delta method over n samples per set (in the eigenbasis): the mean term's error has variance
  # sum 4 d_i^2 (a_i + b_i) / n and bias sum (a_i + b_i) / n; sqrt of a sample variance has
  # variance a_i / (2 n), so the covariance term's error has variance sum 2 (sqrt a_i - sqrt b_i)^2
  # (a_i + b_i) / n. Off-diagonal sample covariances add a bias of order dim^2 max(a, b) / n.
  rng = np.random.default_rng(11)
  dim, n = 6, 20_000
  basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  a, b = rng.uniform(0.2, 4.0, dim), rng.uniform(0.2, 4.0, dim)
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  d = basis.T @ (mu1 - mu2)
  want = d @ d + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  sigma = np.sqrt(np.sum(4 * d ** 2 * (a + b) + 2 * (np.sqrt(a) - np.sqrt(b)) ** 2 * (a + b)) / n)
  bias = (np.sum(a + b) + dim ** 2 * max(a.max(), b.max())) / n

  def streamed(mu, variances):
    samples = mu + (rng.standard_normal((n, dim)) * np.sqrt(variances)) @ basis.T
    moments = fid.RunningMoments()
    for chunk in np.array_split(samples.astype(np.float32), 7):  # float32 features, as extracted
      moments.update(chunk)
    return moments.statistics()

  got = fid.frechet_distance(*streamed(mu1, a), *streamed(mu2, b))
  assert abs(got - want) < 5 * sigma + bias, (got, want, sigma, bias)
  assert 5 * sigma + bias < 0.1 * want  # the tolerance is tight enough to mean something


def test_frechet_distance_rejects_mismatched_or_non_finite_inputs():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match=r"sigma2 has shape \(4, 4\), expected \(3, 3\)"):
    fid.frechet_distance(mu, sigma, mu, np.eye(4))
  with pytest.raises(ValueError, match="mu2 holds non-finite values"):
    fid.frechet_distance(mu, sigma, np.full(3, np.nan), sigma)


# ---- statistics and streaming ----


def test_moments_are_float64_mean_and_unbiased_covariance():
  features = np.random.default_rng(3).standard_normal((50, 6)).astype(np.float32)
  mu, sigma = statistics(features)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError, match="at least 2 feature vectors"):
    statistics(features[:1])


def test_streaming_moments_equal_one_pass_despite_a_large_offset():
  # An offset of 1e4 on unit-variance features: an uncentred sum of squares would lose ~8 digits.
  rng = np.random.default_rng(4)
  features = rng.standard_normal((203, 16)) + 1e4
  moments = fid.RunningMoments()
  for chunk in np.split(features, [1, 8, 8, 100]):  # includes an empty batch
    moments.update(chunk)
  mu, sigma = moments.statistics()
  want_mu, want_sigma = features.mean(axis=0), np.cov(features, rowvar=False)
  assert moments.count == 203
  np.testing.assert_allclose(mu, want_mu, rtol=1e-14)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-9)


def test_accumulator_streams_all_feature_sets_and_drops_padded_rows():
  rng = np.random.default_rng(5)
  batches = [{"pooled": rng.standard_normal((4, 8)), "spatial": rng.standard_normal((4, 5)),
              "probs": rng.dirichlet(np.ones(3), 4)} for _ in range(3)]
  valid = [np.ones(4, bool), np.ones(4, bool), np.array([True, False, False, False])]
  acc = fid.FeatureAccumulator()
  for batch, keep in zip(batches, valid):
    acc.update(batch, valid=keep)
  assert acc.count == 9
  for name in ("pooled", "spatial"):
    rows = np.concatenate([b[name][k] for b, k in zip(batches, valid)])
    for got, want in zip(acc.statistics(name), (rows.mean(axis=0), np.cov(rows, rowvar=False))):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(acc.probs(), np.concatenate([b["probs"][k] for b, k in zip(batches, valid)]))
  with pytest.raises(ValueError, match="unknown feature set 'logits'"):
    acc.statistics("logits")


# ---- Inception Score ----


def test_inception_score_is_one_for_identical_predictions():
  probs = np.tile(np.random.default_rng(6).dirichlet(np.ones(5)), (40, 1))
  mean, std = fid.inception_score(probs, splits=4)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  all_one_class = np.tile(np.eye(5)[2], (40, 1))  # confident, but always the same class
  assert fid.inception_score(all_one_class, splits=1)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_is_k_for_confident_predictions_spread_over_all_classes():
  k = 7
  probs = np.eye(k)[np.arange(10 * k) % k]  # each split of 7 images sees every class once
  mean, std = fid.inception_score(probs, splits=10)
  assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_a_scipy_kl_reference():
  probs = np.random.default_rng(7).dirichlet(np.full(4, 0.3), 60)
  splits = [scipy.stats.entropy(part, part.mean(axis=0), axis=1) for part in np.array_split(probs, 3)]
  want = [np.exp(kl.mean()) for kl in splits]
  mean, std = fid.inception_score(probs, splits=3)
  assert mean == pytest.approx(np.mean(want), rel=1e-10)
  assert std == pytest.approx(np.std(want), rel=1e-8)
  assert 1.0 < mean < 4.0


def test_inception_score_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"splits=5 must be in \[1, 4\]"):
    fid.inception_score(np.full((4, 2), 0.5), splits=5)
  with pytest.raises(ValueError, match="summing to 1"):
    fid.inception_score(np.full((4, 2), 0.3), splits=1)


# ---- features from the segmenter ----


def _deterministic_variables(model, images):
  """Scaled random weights without running the (slow to compile) initialisers."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_extract_features_shapes_and_per_image_class_distribution():
  model = UNetSegmenter(num_classes=3, backbone_stages=(1, 1, 1, 1))
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = _deterministic_variables(model, images)
  features = jax.jit(functools.partial(fid.extract_features, model.apply))(variables, images)
  assert {k: v.shape for k, v in features.items()} == {"pooled": (2, 2048), "spatial": (2, 4 * 4 * 7),
                                                       "probs": (2, 3)}
  assert all(v.dtype == np.float32 for v in features.values())
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  want = np.asarray(jax.nn.softmax(logits, axis=-1)).mean(axis=(1, 2))
  np.testing.assert_allclose(features["probs"], want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(features["probs"]).sum(axis=1), 1.0, atol=1e-5)
  assert np.std(np.asarray(features["pooled"])) > 0
