"""Bit and one-hot label codecs: exact round trips and nearest-valid-code decoding."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from satsynth_jax import labels


@pytest.mark.parametrize("k,bits", [(2, 1), (3, 2), (4, 2), (5, 3), (7, 3), (8, 3), (16, 4), (17, 5), (256, 8)])
def test_num_bits_is_ceil_log2(k, bits):
  assert labels.num_bits(k) == bits


def test_num_bits_rejects_fewer_than_two_classes():
  with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
    labels.num_bits(1)


def test_codes_are_distinct_binary_digits():
  table = labels.class_codes(16)
  assert table.shape == (16, 4)
  assert len({tuple(r) for r in table}) == 16
  np.testing.assert_array_equal(table[9], [1, 0, 0, 1])  # 9 = 0b1001, little-endian


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 256), seed=st.integers(0, 2**31 - 1), encoding=st.sampled_from(labels.ENCODINGS))
def test_round_trip_is_exact(k, seed, encoding):
  mask = np.random.default_rng(seed).integers(0, k, size=(5, 7))
  codes = labels.encode(mask, k, encoding)
  assert codes.shape == (5, 7, labels.num_label_channels(k, encoding))
  np.testing.assert_array_equal(labels.decode(codes, k, encoding), mask)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 256), seed=st.integers(0, 2**31 - 1))
def test_noisy_bits_decode_to_nearest_valid_code(k, seed):
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, k, size=(64,))
  # Arbitrary noise, even large enough to land on an invalid code (>= K) when thresholded.
  noisy = labels.encode(mask, k) + rng.normal(0.0, 0.4, size=(64, labels.num_bits(k)))
  decoded = labels.decode(noisy, k)
  assert decoded.min() >= 0 and decoded.max() < k
  table = labels.class_codes(k)
  distances = ((noisy[:, None, :] - table[None]) ** 2).sum(-1)  # brute force reference
  np.testing.assert_allclose(distances[np.arange(64), decoded], distances.min(-1), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 256), seed=st.integers(0, 2**31 - 1))
def test_small_noise_recovers_the_class(k, seed):
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, k, size=(64,))
  noisy = labels.encode(mask, k) + rng.uniform(-0.45, 0.45, size=(64, labels.num_bits(k)))
  np.testing.assert_array_equal(labels.decode(noisy, k), mask)


def test_invalid_codes_never_decode_beyond_k():
  # K=5 uses 3 bits; codes 5, 6, 7 are invalid and must map to a valid neighbour.
  invalid = labels.class_codes(8)[5:]
  decoded = labels.decode(invalid, 5)
  assert set(decoded.tolist()) <= set(range(5))
  # Little-endian: 5=[1,0,1] is one flip from 1 and 4 (tie -> lower index), 6=[0,1,1] from
  # 2 and 4, 7=[1,1,1] only from 3 among valid codes.
  np.testing.assert_array_equal(decoded, [1, 2, 3])


def test_signed_maps_clip_and_invert():
  x = np.array([-3.0, -1.0, 0.0, 1.0, 2.0])
  np.testing.assert_allclose(labels.from_signed(x), [0.0, 0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(labels.from_signed(labels.to_signed(np.array([0.0, 0.25, 1.0]))), [0.0, 0.25, 1.0])


def test_pair_round_trip_numpy_and_jax_agree():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
  mask = rng.integers(0, 7, size=(2, 8, 8))
  joint = labels.encode_pair(image, mask, 7)
  assert joint.shape == (2, 8, 8, 6) and joint.dtype == np.float32
  assert joint.min() >= -1 and joint.max() <= 1
  out_image, out_mask = labels.decode_pair(joint, 7)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_mask, mask)
  jax_image, jax_mask = labels.decode_pair(jnp.asarray(joint), 7)
  np.testing.assert_array_equal(np.asarray(jax_image), image)
  np.testing.assert_array_equal(np.asarray(jax_mask), mask)


def test_onehot_decodes_by_argmax():
  codes = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
  np.testing.assert_array_equal(labels.decode(codes, 3, "onehot"), [1, 0])


def test_unknown_encoding_is_named():
  with pytest.raises(ValueError, match="unknown label encoding 'gray'"):
    labels.num_label_channels(4, "gray")
