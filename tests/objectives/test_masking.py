"""BERT masking, dynamic (jax) and static (numpy): exact rules on toy rows, rates statistically.

Rates are checked over ~100k maskable tokens against the binomial standard error; the
selection is an exact count per row, so its spread is smaller still and 4 standard errors
leave a wide margin while a wrong rate (e.g. 0.12 or 0.75) lies tens of errors away.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives import masking

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = (PAD, CLS, SEP, MASK)
VOCAB = 1000
SETTINGS = masking.MaskedLM(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
WHOLE = masking.MaskedLM(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, whole_word=True)


def toy_batch(rows: int = 400, length: int = 320, seed: int = 0):
  """Packed rows `[CLS] words [SEP] [CLS] words [SEP] pad...` with random word pieces."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(4, VOCAB, (rows, length)).astype(np.int32)
  segments = np.ones((rows, length), np.int32)
  word_starts = rng.random((rows, length)) < 0.6  # words of 1.67 pieces on average
  for b in range(rows):
    split, end = rng.integers(40, 150), rng.integers(200, length)
    inputs[b, [0, split - 1, split, end - 1]] = [CLS, SEP, CLS, SEP]
    segments[b, split:] = 2
    segments[b, end:] = 0
    inputs[b, end:] = PAD
  return inputs, segments, word_starts


def within(observed: float, expected: float, n: float, sigmas: float = 4.0) -> bool:
  return abs(observed - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n)


@functools.lru_cache
def jitted(settings):
  return jax.jit(lambda r, x, s, w: masking.mask_tokens(r, x, s, settings, w))


def dynamic(settings, seed=0, batch=None):
  inputs, segments, word_starts = toy_batch() if batch is None else batch
  corrupted, targets, weights = jitted(settings)(jax.random.key(seed), inputs, segments,
                                                 word_starts)
  return np.asarray(corrupted), np.asarray(targets), np.asarray(weights)


def static(settings, seed=0, batch=None):
  inputs, segments, word_starts = toy_batch() if batch is None else batch
  outs = [masking.mask_example(x, masking.maskable_np(x, s, settings.special_ids), w,
                               (seed, i), settings, segment_ids_T=s)
          for i, (x, s, w) in enumerate(zip(inputs, segments, word_starts))]
  return tuple(np.stack(parts) for parts in zip(*outs))


BOTH = pytest.mark.parametrize('version', [dynamic, static], ids=['jax', 'numpy'])


def test_maskable_excludes_specials_and_padding():
  inputs = jnp.array([[CLS, 7, 8, SEP, 9, PAD, 1]])
  segments = jnp.array([[1, 1, 1, 1, 2, 0, 0]])
  # RoBERTa-style padding with id 1 (= CLS here) is excluded by segment id, not by value.
  expected = [[False, True, True, False, True, False, False]]
  np.testing.assert_array_equal(masking.maskable(inputs, segments, SPECIALS), expected)
  np.testing.assert_array_equal(masking.maskable_np(inputs[0], segments[0], SPECIALS),
                                expected[0])


@BOTH
def test_hand_counts_on_a_toy_row(version):
  # 6 maskable tokens: rate 0.5 selects exactly 3, rate 1 all, rate 0 none.
  inputs = np.array([[CLS, 10, 11, 12, SEP, 13, 14, 15, SEP, PAD]], np.int32)
  segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
  batch = (inputs, segments, np.ones_like(inputs, bool))
  maskable = masking.maskable_np(inputs[0], segments[0], SPECIALS)
  for rate, count in [(0.5, 3), (1.0, 6), (0.0, 0)]:
    settings = masking.MaskedLM(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rate=rate,
                                mask_fraction=1.0, random_fraction=0.0)
    for seed in range(5):
      corrupted, targets, weights = version(settings, seed, batch)
      assert weights.sum() == count
      assert not weights[0, ~maskable].any()
      np.testing.assert_array_equal(corrupted, np.where(weights > 0, MASK, inputs))
      np.testing.assert_array_equal(targets, np.where(weights > 0, inputs, 0))


def test_count_is_rate_times_units_rounded_stochastically():
  # 10 units at rate 0.15: 1 or 2 selected, 2 with probability 0.5; never anything else.
  inputs, segments, word_starts = toy_batch()  # the shape the other tests compiled for
  segments[:, 10:] = 0
  _, _, weights = dynamic(SETTINGS, 0, (inputs * (segments > 0) + 10, segments, word_starts))
  counts = weights.sum(axis=1)
  assert set(np.unique(counts)) == {1.0, 2.0}
  assert within(np.mean(counts == 2), 0.5, len(counts))


@BOTH
def test_rates_15_percent_and_80_10_10(version):
  inputs, segments, _ = batch = toy_batch()
  corrupted, targets, weights = version(SETTINGS, 0, batch)
  maskable = masking.maskable_np(inputs, segments, SPECIALS)
  selected = weights > 0
  assert maskable.sum() > 100_000
  assert not selected[~maskable].any()  # specials and padding are never selected
  assert within(selected.sum() / maskable.sum(), 0.15, maskable.sum())
  # Each row's count is ⌊0.15·n⌋ or ⌈0.15·n⌉ of its n maskable tokens.
  per_row = maskable.sum(axis=1) * 0.15
  assert np.all((weights.sum(axis=1) >= np.floor(per_row))
                & (weights.sum(axis=1) <= np.ceil(per_row)))
  n = selected.sum()
  masked = corrupted[selected] == MASK
  # A random draw equals the original with probability 1 / (non-special ids).
  same = 1.0 / (VOCAB - len(SPECIALS))
  replaced = (corrupted[selected] != MASK) & (corrupted[selected] != inputs[selected])
  kept = corrupted[selected] == inputs[selected]
  assert within(masked.mean(), 0.8, n)
  assert within(replaced.mean(), 0.1 * (1 - same), n)
  assert within(kept.mean(), 0.1 + 0.1 * same, n)
  np.testing.assert_array_equal(corrupted[~selected], inputs[~selected])
  np.testing.assert_array_equal(targets, np.where(selected, inputs, 0))
  # Random replacements are real, non-special ids spread over the vocabulary.
  random_ids = corrupted[selected][replaced]
  assert not np.isin(random_ids, SPECIALS).any() and random_ids.max() < VOCAB
  assert within(np.mean(random_ids < (VOCAB + len(SPECIALS)) / 2), 0.5, len(random_ids))


def word_index(word_starts, maskable, segments):
  """Word number of each maskable token, by a plain loop (independent of the library)."""
  index = np.full(maskable.shape, -1)
  for b in range(maskable.shape[0]):
    word = -1
    for t in range(maskable.shape[1]):
      if not maskable[b, t]:
        continue
      if (word_starts[b, t] or t == 0 or not maskable[b, t - 1]
          or segments[b, t - 1] != segments[b, t]):
        word += 1
      index[b, t] = word
  return index


@BOTH
def test_whole_word_pieces_share_the_decision_and_rate(version):
  inputs, segments, word_starts = batch = toy_batch(rows=300)
  _, _, weights = version(WHOLE, 0, batch)
  maskable = masking.maskable_np(inputs, segments, SPECIALS)
  words = word_index(word_starts, maskable, segments)
  selected_words = 0
  for b in range(len(inputs)):
    decisions = {}
    for t in np.flatnonzero(maskable[b]):
      decisions.setdefault(words[b, t], set()).add(bool(weights[b, t]))
    assert all(len(d) == 1 for d in decisions.values())  # a word is masked whole or not at all
    chosen = sum(d == {True} for d in decisions.values())
    assert np.floor(0.15 * len(decisions)) <= chosen <= np.ceil(0.15 * len(decisions))
    selected_words += chosen
  assert not weights[~maskable].any()
  # Words are drawn uniformly, so the expected token rate is still 15%.
  assert within(weights.sum() / maskable.sum(), 0.15, maskable.sum() / 1.67)


def test_words_do_not_cross_special_tokens_or_segments():
  # word_starts all False: without the rule the whole row would be one word.
  inputs = np.array([[CLS, 10, 11, SEP, 12, 13, 14, 15]], np.int32)
  segments = np.array([[1, 1, 1, 1, 1, 1, 2, 2]], np.int32)
  starts = masking.unit_starts(masking.maskable(inputs, segments, SPECIALS),
                               jnp.zeros_like(inputs, bool), segments)
  np.testing.assert_array_equal(starts, [[0, 1, 0, 0, 1, 0, 1, 0]])
  starts_np = masking.unit_starts_np(masking.maskable_np(inputs[0], segments[0], SPECIALS),
                                     np.zeros(8, bool), segments[0])
  np.testing.assert_array_equal(starts_np, starts[0])
  # The numpy masker's units are the same: words [10 11], [12 13] and [14 15] (the segment
  # border splits 12..15), each selected whole.
  for seed in range(10):
    _, _, weights = masking.mask_example(
        inputs[0], masking.maskable_np(inputs[0], segments[0], SPECIALS), np.zeros(8, bool),
        seed, dataclasses.replace(WHOLE, rate=0.5), segment_ids_T=segments[0])
    assert weights[6] == weights[7] and weights[4] == weights[5] and weights[1] == weights[2]


def test_static_and_dynamic_agree_on_whole_word_rates():
  batch = toy_batch(rows=300, seed=1)
  rate_jax = dynamic(WHOLE, 1, batch)[2].mean()
  rate_np = static(WHOLE, 1, batch)[2].mean()
  n = batch[2].size / 1.67 / 2
  assert abs(rate_jax - rate_np) <= 4 * np.sqrt(2 * 0.15 * 0.85 / n)


def test_determinism_by_seed():
  batch = toy_batch(rows=8)
  for version in (dynamic, static):
    first, again, other = version(SETTINGS, 3, batch), version(SETTINGS, 3, batch), \
        version(SETTINGS, 4, batch)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])


def test_whole_word_needs_word_starts_and_settings_are_checked():
  inputs = jnp.ones((1, 4), jnp.int32) * 9
  with pytest.raises(ValueError, match='word_starts'):
    masking.mask_tokens(jax.random.key(0), inputs, jnp.ones_like(inputs), WHOLE)
  with pytest.raises(ValueError, match='rate'):
    masking.MaskedLM(mask_id=MASK, vocab_size=VOCAB, rate=1.5)
  with pytest.raises(ValueError, match='fraction'):
    masking.MaskedLM(mask_id=MASK, vocab_size=VOCAB, mask_fraction=0.9, random_fraction=0.2)
