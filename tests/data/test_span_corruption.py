"""data/span_corruption.py: T5's span corruption on hand-worked examples, its exact counts
and rates, determinism per seed, and the lengths that fill a row."""

import numpy as np
import pytest

from data import span_corruption as sc

V, EOS = 100, 1
X, Y, Z = 99, 98, 97  # <extra_id_0>, <extra_id_1>, <extra_id_2>


def test_hand_worked_example():
  # "Thank you [for inviting] me to your party [last week]": two noise spans.
  tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
  mask = np.array([0, 0, 1, 1, 0, 0, 0, 0, 1, 1], bool)
  inputs, targets = sc.apply_mask(tokens, mask, sc.sentinel_ids(V, 2), EOS)
  np.testing.assert_array_equal(inputs, [10, 11, X, 14, 15, 16, 17, Y, EOS])
  np.testing.assert_array_equal(targets, [X, 12, 13, Y, 18, 19, EOS])


def test_a_noise_span_in_the_middle_and_single_tokens():
  tokens = np.array([5, 6, 7, 8, 9])
  mask = np.array([0, 1, 0, 1, 0], bool)
  inputs, targets = sc.apply_mask(tokens, mask, sc.sentinel_ids(V, 3), EOS)
  np.testing.assert_array_equal(inputs, [5, X, 7, Y, 9, EOS])
  np.testing.assert_array_equal(targets, [X, 6, Y, 8, Z, EOS])


def test_too_few_sentinels_and_bad_shapes_raise():
  with pytest.raises(ValueError, match='sentinel'):
    sc.apply_mask(np.arange(5), np.array([0, 1, 0, 1, 0], bool), sc.sentinel_ids(V, 1), EOS)
  with pytest.raises(ValueError, match='shape'):
    sc.apply_mask(np.arange(5), np.zeros(4, bool), sc.sentinel_ids(V, 1), EOS)


@pytest.mark.parametrize('length', [2, 3, 7, 20, 113, 568])
def test_mask_counts_alternation_and_determinism(length):
  recipe = sc.SpanCorruption()
  num_noise, num_spans = recipe.counts(length)
  for seed in range(20):
    mask = sc.noise_mask(length, (7, seed), recipe)
    assert mask.shape == (length,) and mask.sum() == num_noise
    assert not mask[0] and mask[-1]  # a kept span first, a noise span last
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == num_spans
    np.testing.assert_array_equal(mask, sc.noise_mask(length, (7, seed), recipe))


def test_rates_and_mean_span_length():
  """T5's 568 raw tokens: 85 noise tokens (15%) in 28 spans (mean 3.04), every seed; the
  spans' positions vary with the seed, each position about equally likely to be noise."""
  recipe = sc.SpanCorruption(0.15, 3.0)
  assert recipe.counts(568) == (85, 28)
  masks = np.stack([sc.noise_mask(568, seed, recipe) for seed in range(400)])
  assert len({m.tobytes() for m in masks}) == 400
  # Away from the ends (a kept span first, a noise span last), P(noise) is flat at 85/568.
  middle = masks[:, 50:-50].mean(axis=0)
  assert abs(middle.mean() - 85 / 568) < 0.005
  assert np.abs(middle - 85 / 568).max() < 0.08  # 400 draws: 4.7 standard errors at most
  lengths = np.concatenate([np.diff(np.flatnonzero(np.diff(np.r_[0, m.astype(int), 0])))[::2]
                            for m in masks])
  assert lengths.min() >= 1 and lengths.mean() == pytest.approx(85 / 28)


def test_span_corrupt_keeps_every_token_once():
  """Reading the targets' spans back into the inputs' sentinels restores the tokens."""
  tokens = np.arange(10, 10 + 57)
  inputs, targets = sc.span_corrupt(tokens, 3, vocab_size=V, eos_id=EOS)
  spans, current = {}, None
  for t in targets[:-1]:
    if t >= V - 20:
      current = spans.setdefault(int(t), [])
    else:
      current.append(int(t))
  restored = [tok for t in inputs[:-1] for tok in (spans[int(t)] if t >= V - 20 else [int(t)])]
  np.testing.assert_array_equal(restored, tokens)


def test_lengths_fill_the_row_exactly():
  # T5's numbers: 512 inputs take 568 raw tokens and give 114 targets.
  assert sc.lengths_for(512) == (568, 114)
  for inputs_length in (8, 64, 100, 512):
    tokens_length, targets_length = sc.lengths_for(inputs_length)
    inputs, targets = sc.span_corrupt(np.arange(tokens_length) + 2, 0, vocab_size=1000,
                                      eos_id=EOS)
    assert len(inputs) <= inputs_length and len(targets) == targets_length
    # The most raw tokens that fit: one more would overflow the inputs.
    assert sc.corrupted_lengths(tokens_length + 1)[0] > inputs_length
    assert len(inputs) == sc.corrupted_lengths(tokens_length)[0]
  with pytest.raises(ValueError, match='inputs_length'):
    sc.lengths_for(2)


@pytest.mark.parametrize('kwargs, message', [
    (dict(noise_density=0.0), 'noise_density'), (dict(noise_density=1.0), 'noise_density'),
    (dict(mean_span_length=0.5), 'mean_span_length')])
def test_bad_recipes_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sc.SpanCorruption(**kwargs)
