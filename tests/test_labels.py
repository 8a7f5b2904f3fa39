"""Bit and one-hot label codecs: exact round trips and nearest-valid-code decoding."""

import functools

import jax
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


# ---- no-data code, unclipped decoding, random tie breaking ----

SMALL_KS = (2, 3, 5, 7, 8, 16, 255)
SHAPE = (4, 64)  # one mask shape throughout, so jitted codecs compile once per K (random ops compile slowly)


def _no_data(k, kind):
  """An ignore_index that does not collide with the K classes: the records' value, or -1."""
  if kind is None:
    return None
  return -1 if kind == "neg" else (255 if k <= 255 else 65535)


def _reference_ties(codes, table):
  """Brute force in float64: the set of rows at minimal squared distance, per point."""
  d = ((np.asarray(codes, np.float64)[..., None, :] - table[None].astype(np.float64)) ** 2).sum(-1)
  return d, np.isclose(d, d.min(-1, keepdims=True), rtol=0, atol=1e-9)


@functools.cache
def _jax_codec(k, encoding, ignore_index):
  """Jitted (encode, decode-with-key) per codec: one compile each instead of op-by-op dispatch."""
  encode = jax.jit(lambda m: labels.encode(m, k, encoding, ignore_index=ignore_index))
  decode = jax.jit(lambda c, key: labels.decode(c, k, encoding, ignore_index=ignore_index, rng=key))
  return encode, decode


def _rows(decoded, k, ignore_index):
  """Decoded class map -> table rows (no-data is row K)."""
  decoded = np.asarray(decoded)
  return decoded if ignore_index is None else np.where(decoded == ignore_index, k, decoded)


@pytest.mark.parametrize("k,encoding,ignore_index,channels", [
    (2, "bits", None, 1), (2, "bits", 255, 2), (3, "bits", 255, 2), (7, "bits", None, 3),
    (7, "bits", 255, 3), (8, "bits", None, 3), (8, "bits", 255, 4), (16, "bits", None, 4),
    (16, "bits", 255, 5), (255, "bits", 65535, 8), (256, "bits", 65535, 9),
    (7, "onehot", None, 7), (7, "onehot", 255, 8), (16, "onehot", -1, 17)])
def test_channel_counts_with_and_without_no_data(k, encoding, ignore_index, channels):
  assert labels.num_label_channels(k, encoding, ignore_index=ignore_index) == channels
  table = labels.class_codes(k, encoding, ignore_index=ignore_index)
  assert table.shape == (k + (ignore_index is not None), channels)
  assert len({tuple(r) for r in table}) == len(table)


def test_no_data_code_is_integer_k():
  np.testing.assert_array_equal(labels.class_codes(7, ignore_index=255)[7], [1, 1, 1])  # K=7's spare code
  np.testing.assert_array_equal(labels.class_codes(8, ignore_index=255)[8], [0, 0, 0, 1])  # needs a 4th bit
  # The classes keep their codes, zero-padded with the extra bit.
  np.testing.assert_array_equal(labels.class_codes(8, ignore_index=255)[:8, :3], labels.class_codes(8))
  np.testing.assert_array_equal(labels.class_codes(8, ignore_index=255)[:8, 3], 0)


def test_ignore_index_must_not_be_a_class():
  with pytest.raises(ValueError, match="ignore_index=3 collides with a class in \\[0, 7\\)"):
    labels.num_label_channels(7, ignore_index=3)
  with pytest.raises(TypeError, match="ignore_index must be an int"):
    labels.class_codes(7, ignore_index=True)


@settings(max_examples=40, deadline=None)
@given(k=st.one_of(st.sampled_from(SMALL_KS), st.integers(2, 256)), seed=st.integers(0, 2**31 - 1),
       encoding=st.sampled_from(labels.ENCODINGS), no_data=st.sampled_from([None, "records", "neg"]))
def test_round_trip_with_and_without_no_data(k, seed, encoding, no_data):
  ignore = _no_data(k, no_data)
  rng = np.random.default_rng(seed)
  dtype = np.uint8 if ignore == 255 else np.int32  # uint8 records store no-data as 255
  mask = rng.integers(0, k, size=SHAPE).astype(dtype)
  if ignore is not None:
    mask[rng.random(mask.shape) < 0.3] = ignore
  codes = labels.encode(mask, k, encoding, ignore_index=ignore)
  assert codes.shape == mask.shape + (labels.num_label_channels(k, encoding, ignore_index=ignore),)
  np.testing.assert_array_equal(labels.decode(codes, k, encoding, ignore_index=ignore), mask)
  np.testing.assert_array_equal(labels.decode(codes, k, encoding, ignore_index=ignore, rng=rng), mask)
  if k in SMALL_KS:  # JAX on a fixed set of K, so the compiles are shared across examples
    jax_encode, jax_decode = _jax_codec(k, encoding, ignore)
    jax_codes = jax_encode(jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(jax_codes), codes)
    np.testing.assert_array_equal(np.asarray(jax_decode(jax_codes, jax.random.key(seed))), mask)
  image = rng.integers(0, 256, size=mask.shape + (3,), dtype=np.uint8)
  out_image, out_mask = labels.decode_pair(labels.encode_pair(image, mask, k, encoding, ignore_index=ignore), k,
                                           encoding, ignore_index=ignore)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_mask, mask)


@pytest.mark.parametrize("encoding", labels.ENCODINGS)
@pytest.mark.parametrize("k", SMALL_KS)
def test_no_data_code_decodes_to_ignore_index(k, encoding):
  ignore = 255 if k < 255 else -1
  code = labels.class_codes(k, encoding, ignore_index=ignore)[k]
  noisy = code + np.random.default_rng(k).uniform(-0.3, 0.3, size=(50, code.size))
  np.testing.assert_array_equal(labels.decode(noisy, k, encoding, ignore_index=ignore), ignore)
  np.testing.assert_array_equal(np.asarray(labels.decode(jnp.asarray(noisy), k, encoding, ignore_index=ignore)), ignore)
  # Signed units, as the model samples them.
  np.testing.assert_array_equal(labels.decode_signed(labels.to_signed(noisy), k, encoding, ignore_index=ignore), ignore)


@settings(max_examples=30, deadline=None)
@given(k=st.sampled_from(SMALL_KS), seed=st.integers(0, 2**31 - 1), encoding=st.sampled_from(labels.ENCODINGS),
       no_data=st.sampled_from([None, "records"]), scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_numpy_and_jitted_jax_decode_agree(k, seed, encoding, no_data, scale):
  ignore = _no_data(k, no_data)
  channels = labels.num_label_channels(k, encoding, ignore_index=ignore)
  # scale 3: far outside [0, 1] too, as unclipped samples may be.
  codes = np.random.default_rng(seed).normal(0.5, scale, size=(64, channels)).astype(np.float32)
  want = labels.decode(codes, k, encoding, ignore_index=ignore)
  got = jax.jit(lambda c: labels.decode(c, k, encoding, ignore_index=ignore))(jnp.asarray(codes))
  # Compare where the float32 scores are not within rounding of a tie (matmul order may differ).
  d, _ = _reference_ties(codes, labels.class_codes(k, encoding, ignore_index=ignore))
  if encoding == "onehot":
    d = -codes.astype(np.float64)
  gap = np.sort(d, axis=-1)[:, 1] - d.min(-1)
  clear = gap > 1e-4 * (1 + np.abs(d).max(-1))
  np.testing.assert_array_equal(np.asarray(got)[clear], want[clear])


@settings(max_examples=40, deadline=None)
@given(k=st.sampled_from(SMALL_KS), seed=st.integers(0, 2**31 - 1), encoding=st.sampled_from(labels.ENCODINGS),
       no_data=st.sampled_from([None, "records"]))
def test_decode_matches_brute_force_nearest_code(k, seed, encoding, no_data):
  ignore = _no_data(k, no_data)
  table = labels.class_codes(k, encoding, ignore_index=ignore)
  rng = np.random.default_rng(seed)
  # Dyadic values are exact in float32, so ties are exact in both the codec and the reference;
  # values outside [0, 1] are what an unclipped sample has.
  codes = rng.choice(np.array([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5], np.float32), size=SHAPE + table.shape[1:])
  if encoding == "onehot":
    d = -codes.astype(np.float64)  # nearest one-hot row == largest channel
    tie_set = d == d.min(-1, keepdims=True)
  else:
    d, tie_set = _reference_ties(codes, table)
  lowest = tie_set.argmax(-1)
  np.testing.assert_array_equal(_rows(labels.decode(codes, k, encoding, ignore_index=ignore), k, ignore), lowest)
  for decoded in (labels.decode(codes, k, encoding, ignore_index=ignore, rng=rng),
                  _jax_codec(k, encoding, ignore)[1](jnp.asarray(codes), jax.random.key(seed))):
    rows = _rows(decoded, k, ignore)
    assert rows.min() >= 0 and rows.max() < len(table)
    assert np.take_along_axis(tie_set, rows[..., None], axis=-1).all()


def _assert_uniform(decoded, classes):
  decoded = np.asarray(decoded)
  assert set(np.unique(decoded).tolist()) == set(classes)
  share = np.array([(decoded == c).mean() for c in classes])
  # n=6000 gives a standard error of ~0.006 at 1/3; +-0.06 is ~10 sigma, so never flaky.
  np.testing.assert_allclose(share, 1.0 / len(classes), atol=0.06)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_k7_spare_code_ties_go_uniformly_to_3_5_6(backend):
  n = 6000
  spare = np.tile(labels.class_codes(8)[7], (n, 1))  # [1, 1, 1]: one bit from 3, 5 and 6
  beyond = labels.from_signed(np.random.default_rng(0).uniform(1.0, 3.0, size=(n, 3)))  # all clip to [1, 1, 1]
  np.testing.assert_array_equal(beyond, spare)
  np.testing.assert_array_equal(labels.decode(spare, 7), 3)  # without rng: the lowest tied class
  if backend == "numpy":
    decoded = labels.decode(spare, 7, rng=np.random.default_rng(1))
    clipped = labels.decode(beyond, 7, rng=np.random.default_rng(2))
  else:
    decode = jax.jit(lambda c, key: labels.decode(c, 7, rng=key))
    decoded = decode(jnp.asarray(spare), jax.random.key(1))
    clipped = decode(jnp.asarray(beyond), jax.random.key(2))
  _assert_uniform(decoded, [3, 5, 6])
  _assert_uniform(clipped, [3, 5, 6])


def test_k5_invalid_code_ties_split_evenly():
  code5 = np.tile(labels.class_codes(8)[5], (6000, 1))  # [1, 0, 1]: one flip from 1 and 4
  _assert_uniform(labels.decode(code5, 5, rng=np.random.default_rng(0)), [1, 4])


def test_unclipped_points_beyond_the_spare_code_spread_over_its_neighbours():
  # Unclipped, the weakest bit of a point beyond [1, 1, 1] is cleared: symmetric, so no class is favoured.
  beyond = np.random.default_rng(0).uniform(1.0, 3.0, size=(6000, 3))
  _assert_uniform(labels.decode_signed(beyond, 7), [3, 5, 6])


def test_unclipped_decoding_differs_from_clipped_where_clipping_makes_a_tie():
  # Signed K=7 sample beyond the spare code; bit 1 is the weakest, so 0b101 = 5 is nearest.
  label = np.array([1.4, 1.2, 1.6], np.float32)
  assert labels.decode(labels.from_signed(label), 7) == 3  # clipped: tie at [1, 1, 1] -> lowest
  assert labels.decode_signed(label, 7) == 5
  joint = np.concatenate([[1.5, -2.0, 0.0], label]).astype(np.float32)
  image, mask = labels.decode_pair(joint, 7)
  np.testing.assert_array_equal(image, [255, 0, 128])  # the image is still clipped
  assert mask == 5
  _, jax_mask = labels.decode_pair(jnp.asarray(joint), 7, rng=jax.random.key(0))
  assert int(jax_mask) == 5  # no tie, so rng does not matter
  # One-hot: two channels beyond 1 clip to a tie; unclipped the larger one wins.
  onehot = np.array([1.2, 1.5, -1.0], np.float32)
  assert labels.decode(labels.from_signed(onehot), 3, "onehot") == 0
  assert labels.decode_pair(np.concatenate([[0.0] * 3, onehot]), 3, "onehot")[1] == 1


def test_power_of_two_bits_decode_the_same_clipped_or_not():
  x = np.random.default_rng(0).normal(0.0, 2.0, size=(500, 4)).astype(np.float32)
  np.testing.assert_array_equal(labels.decode_signed(x, 16), labels.decode(labels.from_signed(x), 16))


def test_invalid_mask_values_are_not_silently_encoded():
  with pytest.raises(ValueError, match=r"mask values \[7\] are not classes in \[0, 7\)"):
    labels.encode(np.array([0, 7]), 7)
  with pytest.raises(ValueError, match=r"mask values \[-1, 9\] are not classes in \[0, 7\) or ignore_index=255"):
    labels.encode(np.array([-1, 9, 255]), 7, ignore_index=255)
  with pytest.raises(ValueError, match="not classes"):
    labels.encode_pair(np.zeros((1, 2, 3), np.uint8), np.array([[0, 255]]), 7)  # no-data without ignore_index
  # JAX cannot raise inside jit: invalid pixels become NaN (caller validates); valid ones are exact.
  codes = jax.jit(lambda m: labels.encode(m, 7, ignore_index=255))(jnp.array([3, 9, 255, -2]))
  assert np.isnan(np.asarray(codes)[[1, 3]]).all()
  np.testing.assert_array_equal(np.asarray(codes)[[0, 2]], [[1, 1, 0], [1, 1, 1]])


def test_rng_kind_must_match_the_array_kind():
  with pytest.raises(TypeError, match="numpy.random.Generator"):
    labels.decode(np.zeros((2, 3)), 7, rng=jax.random.key(0))
  with pytest.raises(TypeError, match="JAX PRNG key"):
    labels.decode(jnp.zeros((2, 3)), 7, rng=np.random.default_rng(0))


def test_decode_rejects_codes_with_the_wrong_channel_count():
  with pytest.raises(ValueError, match="have 4 channels, got shape \\(2, 3\\)"):
    labels.decode(np.zeros((2, 3)), 8, ignore_index=255)


def test_decode_pair_jits_with_a_raw_prng_key():
  joint = jnp.asarray(labels.encode_pair(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 255), 7, ignore_index=255))
  decode = jax.jit(lambda j, key: labels.decode_pair(j, 7, ignore_index=255, rng=key))
  _, mask = decode(joint, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(mask), 255)


@pytest.mark.parametrize("encoding", labels.ENCODINGS)
def test_encode_real_pair_codes_no_data_or_fills_it(encoding):
  image = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)  # [1, 2, 3]
  mask = np.array([[4, 255]], np.uint8)
  rgb = image / 255.0 * 2 - 1
  coded = labels.encode_real_pair(image, mask, 5, encoding, ignore_index=255, no_data_code=True)
  want_codes = labels.class_codes(5, encoding, ignore_index=255)[[4, 5]] * 2 - 1  # row 5: no-data
  np.testing.assert_allclose(coded, np.concatenate([rgb, want_codes[None]], -1), atol=1e-6)
  filled = labels.encode_real_pair(image, mask, 5, encoding, ignore_index=255, no_data_code=False, fill_class=2)
  want_codes = labels.class_codes(5, encoding)[[4, 2]] * 2 - 1
  np.testing.assert_allclose(filled, np.concatenate([rgb, want_codes[None]], -1), atol=1e-6)
  default = labels.encode_real_pair(image, mask, 5, encoding, ignore_index=255, no_data_code=False)
  np.testing.assert_allclose(default[0, 1, 3:], labels.class_codes(5, encoding)[0] * 2 - 1)  # fill_class 0


def test_encode_real_pair_defaults_to_bits_and_jits():
  image = np.zeros((2, 2, 3), np.uint8)
  mask = np.array([[1, 255], [4, 0]], np.uint8)
  bits = labels.encode_real_pair(image, mask, 5, ignore_index=255, no_data_code=False)
  assert bits.shape == (2, 2, 3 + labels.num_bits(5))  # "bits" when no encoding is given
  jitted = jax.jit(lambda i, m: labels.encode_real_pair(i, m, 5, "bits", ignore_index=255, no_data_code=False))
  np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(image), jnp.asarray(mask))), bits, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [0, 1, 5])
def test_an_ignore_index_that_is_a_class_is_refused_including_class_0(ignore_index):
  """Killed mutants `1 <= ignore_index` and `0 < ignore_index` (class 0 accepted as no-data)."""
  with pytest.raises(ValueError, match=f"ignore_index={ignore_index} collides"):
    labels.encode(np.zeros((2, 2), np.int32), 6, ignore_index=ignore_index)
  labels.encode(np.zeros((2, 2), np.int32), 6, ignore_index=6)  # the first index past the classes is fine


def test_sample_decoders_pass_the_tie_breaking_rng_through():
  """Label channels at exactly 0 are equidistant from every bit code of K=4: only the rng breaks
  the ties. decode_signed and decode_pair must hand it to decode, not fall back to argmin."""
  label = np.zeros((64, 64, 2), np.float32)  # signed units: the midpoint of every code
  joint = np.concatenate([np.zeros((64, 64, 3), np.float32), label], axis=-1)
  spread = labels.decode_signed(label, 4, rng=np.random.default_rng(0))
  assert set(np.unique(spread).tolist()) == {0, 1, 2, 3}  # argmin alone would give class 0 everywhere
  np.testing.assert_array_equal(spread, labels.decode(np.full((64, 64, 2), 0.5, np.float32), 4,
                                                      rng=np.random.default_rng(0)))
  _, mask = labels.decode_pair(joint, 4, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(mask, spread)


def test_defaults_dtypes_and_unknown_encodings():
  """Killed mutants: the "bits" default, float32 one-hot codes, uint8 decoded images, and an
  unknown encoding that class_codes must refuse rather than treat as bits."""
  assert labels.num_label_channels(6) == 3 and labels.num_label_channels(6, ignore_index=6) == 3
  assert labels.num_label_channels(8, ignore_index=8) == 4
  assert labels.class_codes(5, "onehot").dtype == np.float32
  assert labels.encode(np.array([[0, 4]]), 5, "onehot").dtype == np.float32
  image, _ = labels.decode_pair(np.zeros((2, 2, 6), np.float32), 6)
  assert image.dtype == np.uint8
  with pytest.raises(ValueError, match="unknown label encoding 'gray'"):
    labels.class_codes(4, "gray")


def test_one_hot_decoding_separates_channels_closer_than_float32_rounding_of_1_minus_2x():
  """-x keeps the tiny margin that 1 - 2x would round away: channel 1 wins, not the lowest index."""
  codes = np.array([[0.0, 1e-9, 0.0, 0.0]], np.float32)
  assert labels.decode(codes, 4, "onehot").tolist() == [1]


def test_values_that_wrap_into_a_class_under_an_int32_cast_are_refused():
  """2**32 + 3 would become class 3 if narrowed to int32 before the range check."""
  with pytest.raises(ValueError, match="4294967299"):
    labels.encode(np.array([[2**32 + 3]], np.int64), 6)
