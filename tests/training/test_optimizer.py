import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training import optimizer


def _cfg(**kw):
  base = dict(learning_rate=1.0, warmup_steps=10, decay='cosine', end_learning_rate_factor=0.1)
  base.update(kw)
  return optimizer.OptimizerConfig(**base)


def test_schedule_warms_up_then_decays_to_the_end_value():
  lr = optimizer.learning_rate_schedule(_cfg(), num_steps=110)
  assert float(lr(0)) == 0.0
  assert np.isclose(float(lr(5)), 0.5)
  assert np.isclose(float(lr(10)), 1.0)
  assert np.isclose(float(lr(110)), 0.1)
  linear = optimizer.learning_rate_schedule(_cfg(decay='linear'), num_steps=110)
  assert np.isclose(float(linear(60)), 0.55)


def test_rsqrt_is_vaswanis_schedule():
  """d^-0.5 · min(step^-0.5, step · warmup^-1.5), the peak d^-0.5 · warmup^-0.5 named."""
  d, warmup = 512, 16
  peak = d ** -0.5 * warmup ** -0.5
  lr = optimizer.learning_rate_schedule(_cfg(learning_rate=peak, warmup_steps=warmup,
                                             decay='rsqrt'), num_steps=1000)
  for step in (1, 8, 16, 17, 64, 999):
    expected = d ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
    assert np.isclose(float(lr(step)), expected, rtol=1e-5), step


def test_weight_decay_skips_norms_and_biases():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))},
            'norm': {'scale': jnp.ones((2,))}}
  mask = optimizer.decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False}}
  zero = {'dense': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))},
          'norm': {'scale': jnp.zeros((2,))}}
  # With zero gradients, AdamW's update is the decay alone: -lr * wd * param where masked in.
  tx = optimizer.make_optimizer(_cfg(learning_rate=1.0, warmup_steps=0, decay='constant',
                                     weight_decay=0.5), 10)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5)
  np.testing.assert_allclose(updates['dense']['bias'], 0.0)
  np.testing.assert_allclose(updates['norm']['scale'], 0.0)


def test_bad_decay_names_the_field():
  with pytest.raises(ValueError, match='config.optimizer.decay'):
    _cfg(decay='exponential')


def test_gradients_are_clipped_to_clip_norm_before_adam():
  """Adam's update hides a gradient's scale, so the clip is read in its first moment."""
  params = {'w': jnp.zeros((3,))}
  grads = {'w': jnp.array([3.0, 4.0, 0.0]) * 2}  # global norm 10
  for clip_norm, expected_norm in ((1.0, 1.0), (100.0, 10.0)):
    tx = optimizer.make_optimizer(_cfg(warmup_steps=0, clip_norm=clip_norm), 10)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, 'mu')['w']
    np.testing.assert_allclose(mu, (1 - 0.9) * grads['w'] * expected_norm / 10, rtol=1e-6)
