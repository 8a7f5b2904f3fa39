"""Class-presence conditioning: presence vectors, condition dropout, guidance, sampling plans, their metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from satsynth_jax import labels, presence
from satsynth_jax.diffusion import guidance
from satsynth_jax.metrics import synthetic

IGNORE = 255


def test_presence_vectors_count_classes_and_never_no_data():
  masks = np.array([[[0, 0], [2, IGNORE]], [[IGNORE, IGNORE], [IGNORE, IGNORE]], [[3, 3], [3, 1]]], np.uint8)
  want = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]], np.float32)
  np.testing.assert_array_equal(labels.presence(masks, 4), want)
  np.testing.assert_array_equal(labels.presence(masks[0], 4), want[0])  # one mask: [K]
  np.testing.assert_array_equal(labels.presence(jnp.asarray(masks), 4), want)  # JAX input: the same rule
  # K = 300 classes in uint16 masks: 65535 is no-data, 299 a class.
  big = np.array([[299, 65535]], np.uint16)
  assert labels.presence(big, 300).sum() == 1 and labels.presence(big, 300)[299] == 1


def test_presence_code_maps_to_plus_minus_one_and_dropped_rows_to_zero():
  p = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  np.testing.assert_array_equal(guidance.presence_code(p), [[1, -1, 1], [-1, 1, -1]])
  np.testing.assert_array_equal(guidance.presence_code(p, jnp.array([True, False])), [[1, -1, 1], [0, 0, 0]])


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_condition_dropout_drops_rows_at_its_rate(rate):
  keep = np.asarray(guidance.keep_mask(jax.random.key(0), 20_000, rate))
  dropped = 1.0 - keep.mean()
  assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / 20_000) + 1e-9, dropped
  other = np.asarray(guidance.keep_mask(jax.random.key(1), 20_000, rate))
  assert rate == 0 or not np.array_equal(keep, other)  # a fresh draw per key (per step)


def test_guidance_formula_against_a_hand_computed_case():
  conditional, unconditional = jnp.array([2.0, -1.0]), jnp.array([1.0, 1.0])
  np.testing.assert_allclose(guidance.guided(conditional, unconditional, 0.0), conditional)  # w=0: conditional
  np.testing.assert_allclose(guidance.guided(conditional, unconditional, 2.0), [4.0, -5.0])  # 3c - 2u


def test_guided_denoiser_equals_separate_conditional_and_unconditional_calls():
  calls = []

  def denoise_with(code, x, t, x0_prev):  # a model whose output depends on x, t, the code and x0_prev
    calls.append(x.shape[0])
    return x * (1.0 + code.sum(axis=1))[:, None] + t[:, None] + (0 if x0_prev is None else 0.5 * x0_prev)

  x = jnp.arange(6.0).reshape(3, 2)
  t = jnp.array([3, 4, 5])
  prev = jnp.ones((3, 2))
  code = guidance.presence_code(jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
  want = guidance.guided(denoise_with(code, x, t, prev), denoise_with(jnp.zeros_like(code), x, t, prev), 1.5)
  calls.clear()
  got = guidance.guided_denoise_fn(denoise_with, code, 1.5)(x, t, prev)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert calls == [6]  # one call on the doubled batch
  calls.clear()
  plain = guidance.guided_denoise_fn(denoise_with, code, 0.0)(x, t)
  np.testing.assert_allclose(plain, denoise_with(code, x, t, None))
  assert calls == [3, 3]  # scale 0: the conditional call alone (the second is the reference above)


def test_real_plan_repeats_each_train_vector_in_record_order():
  vectors = np.array([[1, 0, 0], [0, 1, 1]], np.uint8)
  rows = presence.plan_vectors("real", vectors, 5, class_pixels=[1, 1, 1], seed=0)
  np.testing.assert_array_equal(rows, vectors[[0, 1, 0, 1, 0]])
  assert presence.plan_vectors("none", vectors, 5, class_pixels=[1, 1, 1], seed=0) is None


def test_rare_plan_weights_pairs_by_their_rarest_classes_from_train_frequencies():
  # Class 2 holds 1% of the pixels: the pair holding it is asked for far more often than its 1/3.
  vectors = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], np.uint8)
  pixels = [90, 9, 1]
  f = np.array(pixels) / 100
  score = vectors @ (1 / np.sqrt(f))
  np.testing.assert_allclose(presence.rare_probabilities(vectors, pixels), score / score.sum())
  rows = presence.plan_vectors("rare", vectors, 30_000, class_pixels=pixels, seed=3)
  drawn = np.array([np.mean((rows == v).all(axis=1)) for v in vectors])
  np.testing.assert_allclose(drawn, score / score.sum(), atol=0.01)
  again = presence.plan_vectors("rare", vectors, 30_000, class_pixels=pixels, seed=3)
  np.testing.assert_array_equal(rows, again)  # deterministic in the seed
  assert not np.array_equal(rows, presence.plan_vectors("rare", vectors, 30_000, class_pixels=pixels, seed=4))
  # A class absent from train (no pixels) adds no weight.
  np.testing.assert_allclose(presence.rare_probabilities(vectors, [90, 10, 0])[2],
                             presence.rare_probabilities(vectors, [90, 10, 0])[0])


def test_required_classes_are_asked_for_by_every_row():
  vectors = np.array([[1, 0, 0], [0, 1, 0]], np.uint8)
  rows = presence.plan_vectors("real", vectors, 4, class_pixels=[1, 1, 1], require=[2], seed=0)
  np.testing.assert_array_equal(rows[:, 2], 1)
  np.testing.assert_array_equal(rows[:, :2], vectors[[0, 1, 0, 1], :2])
  assert vectors[:, 2].sum() == 0  # the train vectors are left alone
  assert presence.class_indices(("field", "road", "vehicle"), ("vehicle", "field")) == [2, 0]


def test_class_share_distance_and_presence_accuracy():
  np.testing.assert_allclose(synthetic.class_shares([3, 1, 0]), [0.75, 0.25, 0.0])
  assert synthetic.total_variation([0.75, 0.25, 0], [0.75, 0.25, 0]) == 0
  assert synthetic.total_variation([1, 0, 0], [0, 0, 1]) == 1
  assert synthetic.total_variation([0.5, 0.5, 0], [0.5, 0.25, 0.25]) == pytest.approx(0.25)
  requested = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
  produced = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [1, 1, 1]])
  accuracy = synthetic.presence_accuracy(requested, produced)
  np.testing.assert_allclose(accuracy[:2], [2 / 3, 1 / 2])  # class 0: rows 0, 1 of 0-2; class 1: row 2 of 0, 2
  assert np.isnan(accuracy[2])  # nobody asked for class 2
  with pytest.raises(ValueError, match="shape"):
    synthetic.presence_accuracy(requested, produced[:3])
