"""The seq2seq objective: label-smoothed cross-entropy by hand, padding weightless."""

import jax.numpy as jnp
import numpy as np
import pytest

import objectives
from objectives import seq2seq


def test_smoothed_loss_by_hand():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
  targets = jnp.array([[0, 2]])
  weights = jnp.array([[1.0, 0.0]])  # the second token is padding
  eps = 0.1
  log_p = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
  expected = (1 - eps) * -log_p[0] + eps * np.mean(-log_p)
  sums = seq2seq.smoothed_sums(logits, targets, weights, eps)
  assert float(sums['loss_sum']) == pytest.approx(expected, rel=1e-6)
  assert float(sums['nll_sum']) == pytest.approx(-log_p[0], rel=1e-6)
  assert float(sums['weight']) == 1.0 and float(sums['correct']) == 1.0
  plain = seq2seq.smoothed_sums(logits, targets, weights, 0.0)
  assert float(plain['loss_sum']) == pytest.approx(-log_p[0], rel=1e-6)


def test_summary_reports_the_unsmoothed_perplexity():
  report = seq2seq.summarize({'loss_sum': 4.0, 'nll_sum': 2.0, 'correct': 1.0, 'weight': 2.0})
  assert report['loss'] == 2.0 and report['nll'] == 1.0
  assert report['perplexity'] == pytest.approx(np.e) and report['accuracy'] == 0.5


def test_build_binds_label_smoothing_and_checks_it():
  assert objectives.build('seq2seq', {'label_smoothing': 0.1}).settings.label_smoothing == 0.1
  with pytest.raises(ValueError, match='label_smoothing'):
    objectives.build('seq2seq', {'label_smoothing': 1.0})
  with pytest.raises(ValueError, match='does not take'):
    objectives.build('seq2seq', {'temperature': 1.0})
