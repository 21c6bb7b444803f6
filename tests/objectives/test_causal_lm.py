"""The causal LM loss against a hand computation on a toy batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from objectives import causal_lm
from tests import tolerances


class TableLM:
  """A 'model' whose logits at each position are a fixed table row: easy to compute by hand."""

  def __init__(self, logits_BTV):
    self.logits = jnp.asarray(logits_BTV, jnp.float32)

  def apply(self, variables, tokens, **kwargs):
    del variables, tokens, kwargs
    return self.logits


def test_weights_skip_padding_and_document_boundaries():
  batch = {'inputs': jnp.array([[2, 5, 6, 2, 7, 0]]),
           'segment_ids': jnp.array([[1, 1, 1, 2, 2, 0]])}
  targets, weights = causal_lm.next_token_targets(batch)
  np.testing.assert_array_equal(targets, [[5, 6, 2, 7, 0, 0]])
  # 5|2 and 6|5 are inside doc 1; 2 would cross into doc 2; 7|2 inside doc 2; 0 is padding;
  # the last position has no next token.
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0]])


def test_loss_equals_hand_computation():
  vocab = 3
  # Row logits chosen so the probabilities are simple: softmax([0, ln 2, ln 1]) = [1/4, 2/4, 1/4].
  row = [0.0, math.log(2.0), 0.0]
  logits = np.tile(row, (1, 4, 1)).reshape(1, 4, vocab)
  batch = {'inputs': jnp.array([[0, 1, 2, 0]]),
           'segment_ids': jnp.array([[1, 1, 1, 0]]),
           'positions': jnp.array([[0, 1, 2, 0]])}
  loss, metrics = causal_lm.loss_fn({}, batch, jax.random.key(0), model=TableLM(logits))
  # Targets with weight: 1 (p = 1/2) and 2 (p = 1/4); the last target is padding.
  expected = (-math.log(0.5) - math.log(0.25)) / 2
  assert math.isclose(float(loss), expected, rel_tol=1e-6)
  assert float(metrics['weight']) == 2.0
  assert float(metrics['correct']) == 1.0  # the most likely token is 1: right once
  report = causal_lm.summarize(metrics)
  assert math.isclose(report['perplexity'], math.exp(expected), rel_tol=1e-6)
  assert report['accuracy'] == 0.5


def test_cross_entropy_and_its_gradient_match_log_softmax():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)

  def reference(x):
    log_probs = jax.nn.log_softmax(x, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

  losses, correct = causal_lm.cross_entropy(logits, targets)
  tolerances.assert_close(losses, reference(logits))
  np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == targets)
  grad = jax.grad(lambda x: jnp.sum(causal_lm.cross_entropy(x, targets)[0] ** 2))(logits)
  expected = jax.grad(lambda x: jnp.sum(reference(x) ** 2))(logits)
  tolerances.assert_close(grad, expected)
  # bfloat16 logits: the loss is taken in float32 and the gradient comes back in bfloat16.
  grad_bf16 = jax.grad(lambda x: jnp.sum(causal_lm.cross_entropy(x, targets)[0]))(
      logits.astype(jnp.bfloat16))
  assert grad_bf16.dtype == jnp.bfloat16
