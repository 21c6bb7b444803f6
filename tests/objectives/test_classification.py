"""Classification and regression: losses by hand, split metrics from sums against sklearn/scipy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as sk

from objectives import classification
from objectives import regression


class TableHead:
  """A 'model' whose classifier logits are a fixed table."""

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)

  def apply(self, variables, inputs_BT, **kwargs):
    return {'logits': self.logits}


def batch_of(labels, padding_rows=0):
  rows = len(labels) + padding_rows
  segments = np.ones((rows, 4), np.int32)
  segments[len(labels):] = 0
  return {'inputs': np.full((rows, 4), 7, np.int32),
          'token_types': np.zeros((rows, 4), np.int32), 'segment_ids': segments,
          'positions': np.tile(np.arange(4, dtype=np.int32), (rows, 1)),
          'label': np.concatenate([labels, np.zeros(padding_rows, np.asarray(labels).dtype)])}


def test_classification_loss_and_confusion_by_hand():
  # Logits [ln 3, 0] give p = [3/4, 1/4]; the padding row (last) must not count.
  logits = np.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)],
                     [9.0, -9.0]], np.float32)
  batch = batch_of(np.array([0, 1, 1], np.int32), padding_rows=1)
  settings = classification.Classification(num_classes=2)
  loss, sums = classification.loss_fn({}, batch, jax.random.key(0), model=TableHead(logits),
                                      settings=settings)
  expected = (-math.log(0.75) - math.log(0.25) - math.log(0.75)) / 3
  assert math.isclose(float(loss), expected, rel_tol=1e-6)
  sums = jax.device_get(sums)
  assert float(sums['weight']) == 3.0 and float(sums['correct']) == 2.0
  # true 0 -> 0; true 1 -> 0 (wrong); true 1 -> 1.
  np.testing.assert_array_equal(classification.confusion_matrix(sums), [[1, 0], [1, 1]])
  report = classification.summarize(sums)
  # Positive class 1: tp 1, fp 0, fn 1 -> F1 = 2/3; class 0: tp 1, fp 1, fn 0 -> 2/3.
  assert math.isclose(report['f1'], 2 / 3) and math.isclose(report['macro_f1'], 2 / 3)
  # MCC = (tp·tn − fp·fn) / √((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (1 − 0) / √(1·2·2·1) = 1/2.
  assert math.isclose(report['mcc'], 0.5)
  assert math.isclose(report['accuracy'], 2 / 3)


def test_rows_marked_as_padding_by_the_pipeline_do_not_count():
  logits = np.array([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], np.float32)
  batch = batch_of(np.array([0, 0], np.int32))
  batch['example_weight'] = np.array([1.0, 0.0], np.float32)
  loss, sums = classification.loss_fn({}, batch, jax.random.key(0), model=TableHead(logits),
                                      settings=classification.Classification(num_classes=2))
  assert math.isclose(float(loss), -math.log(0.75), rel_tol=1e-6)
  assert float(sums['weight']) == 1.0 and float(sums['confusion_0_1']) == 0.0


def split_sums(labels, predictions, num_classes, batches=4):
  """The summed metrics of a split spread over several batches, as the trainer adds them."""
  settings = classification.Classification(num_classes=num_classes)
  totals = {}
  for part_labels, part_predictions in zip(np.array_split(labels, batches),
                                           np.array_split(predictions, batches)):
    logits = np.eye(num_classes, dtype=np.float32)[part_predictions] * 3.0
    _, sums = classification.loss_fn({}, batch_of(part_labels), jax.random.key(0),
                                     model=TableHead(logits), settings=settings)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


@pytest.mark.parametrize('num_classes', [2, 3])
def test_split_metrics_from_sums_equal_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  labels = rng.integers(0, num_classes, 203).astype(np.int32)
  # Predictions right ~60% of the time, so every metric is away from its extremes.
  predictions = np.where(rng.random(203) < 0.6, labels,
                         rng.integers(0, num_classes, 203)).astype(np.int32)
  report = classification.summarize(split_sums(labels, predictions, num_classes))
  assert math.isclose(report['accuracy'], sk.accuracy_score(labels, predictions), rel_tol=1e-9)
  assert math.isclose(report['macro_f1'], sk.f1_score(labels, predictions, average='macro'),
                      rel_tol=1e-9)
  assert math.isclose(report['mcc'], sk.matthews_corrcoef(labels, predictions), rel_tol=1e-9)
  assert report['examples'] == 203
  if num_classes == 2:
    assert math.isclose(report['f1'], sk.f1_score(labels, predictions), rel_tol=1e-9)


def test_metric_edge_cases_follow_sklearn():
  # A class never predicted nor true is left out of macro-F1; constant predictions: MCC 0.
  labels = np.array([0, 0, 1, 1], np.int32)
  predictions = np.array([0, 0, 0, 0], np.int32)
  report = classification.summarize(split_sums(labels, predictions, 3, batches=2))
  assert math.isclose(report['macro_f1'], sk.f1_score(labels, predictions, average='macro',
                                                       zero_division=0.0))
  assert report['mcc'] == sk.matthews_corrcoef(labels, predictions) == 0.0


def regression_sums(predictions, labels, batches=3, column=True):
  totals = {}
  for part_x, part_y in zip(np.array_split(predictions, batches), np.array_split(labels, batches)):
    logits = part_x[:, None] if column else part_x
    _, sums = regression.loss_fn({}, batch_of(part_y.astype(np.float32), padding_rows=2),
                                 jax.random.key(0), model=TableHead(np.concatenate(
                                     [logits, np.full((2, *logits.shape[1:]), 99.0)])))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


def test_regression_loss_by_hand():
  batch = batch_of(np.array([1.0, 2.0, 4.0], np.float32), padding_rows=1)
  model = TableHead(np.array([[1.5], [2.0], [3.0], [50.0]], np.float32))
  loss, sums = regression.loss_fn({}, batch, jax.random.key(0), model=model)
  assert math.isclose(float(loss), (0.25 + 0.0 + 1.0) / 3, rel_tol=1e-6)
  assert float(sums['weight']) == 3.0


@pytest.mark.parametrize('column', [True, False], ids=['B1', 'B'])
def test_pearson_from_sums_equals_scipy(column):
  rng = np.random.default_rng(0)
  labels = rng.uniform(0, 5, 157)
  predictions = (labels + rng.normal(0, 1.2, 157)).astype(np.float32)
  labels = labels.astype(np.float32)
  report = regression.summarize(regression_sums(predictions, labels, column=column))
  expected = scipy.stats.pearsonr(predictions, labels).statistic
  assert math.isclose(report['pearson'], expected, rel_tol=1e-4)
  assert math.isclose(report['loss'], float(np.mean((predictions - labels) ** 2)), rel_tol=1e-5)
  assert report['examples'] == 157


def test_spearman_is_scipys_on_per_example_predictions():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 6, 80).astype(np.float64)  # ties, as in STS-B's labels
  predictions = labels + rng.normal(0, 2.0, 80)
  expected = scipy.stats.spearmanr(predictions, labels).statistic
  assert math.isclose(regression.spearman(predictions, labels), expected, rel_tol=1e-12)
  assert 0.3 < expected < 0.95
  assert regression.spearman(np.ones(5), np.arange(5)) == 0.0  # constant: no correlation
