"""Remat policies and scanned layers change memory and compile time, never the numbers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gpt
from tests import tolerances

TINY = dict(vocab_size=37, max_len=12, num_layers=3, num_heads=2, embed_dim=16, mlp_dim=32)


def _batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, TINY['vocab_size'], (2, 10)), jnp.int32)
  segments = jnp.asarray([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], jnp.int32)
  return tokens, segments


def _loss_and_grads(config, params):
  tokens, segments = _batch()
  model = gpt.GPT(config)

  def loss(p):
    logits = model.apply({'params': p}, tokens, segment_ids_BT=segments)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segments != 0))

  return jax.jit(jax.value_and_grad(loss))(params)


def _init(config):
  tokens, _ = _batch()
  variables = gpt.GPT(config).init(jax.random.key(0), tokens)
  return nn.unbox(variables)['params']


@pytest.mark.parametrize('remat', ['full', 'save_dots'])
def test_remat_gives_the_same_loss_and_gradients(remat):
  base = gpt.GPTConfig(**TINY)
  params = _init(base)
  loss, grads = _loss_and_grads(base, params)
  loss_r, grads_r = _loss_and_grads(dataclasses.replace(base, remat=remat), params)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  tolerances.assert_trees_close(grads_r, grads)


def _stack_layers(params, num_layers):
  """The unrolled model's block_i parameters stacked as the scanned model's 'blocks'."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f'block_{i}']
                                                     for i in range(num_layers)])
  rest = {k: v for k, v in params.items() if not k.startswith('block_')}
  return {**rest, 'blocks': stacked}


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_layers_equal_unrolled_layers(remat):
  base = gpt.GPTConfig(**TINY)
  params = _init(base)
  scanned_cfg = dataclasses.replace(base, scan_layers=True, remat=remat)
  scanned_params = _stack_layers(params, TINY['num_layers'])
  # The scanned model's own init has exactly this structure and these shapes.
  expected = jax.tree.map(lambda x: x.shape, _init(scanned_cfg))
  assert jax.tree.map(lambda x: x.shape, scanned_params) == expected
  loss, grads = _loss_and_grads(base, params)
  loss_s, grads_s = _loss_and_grads(scanned_cfg, scanned_params)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  tolerances.assert_trees_close(grads_s, _stack_layers(grads, TINY['num_layers']))


def test_scanned_layers_decode_with_the_cache():
  config = gpt.GPTConfig(**TINY, scan_layers=True)
  tokens, _ = _batch()
  model = gpt.GPT(config)
  params = _init(config)
  full = model.apply({'params': params}, tokens)
  cache = model.init(jax.random.key(0), jnp.zeros((2, TINY['max_len']), jnp.int32),
                     decode=True)['cache']
  step = jax.jit(lambda v, t: model.apply(v, t, decode=True, mutable=['cache']))
  logits, mutated = step({'params': params, 'cache': cache}, tokens[:, :4])
  chunks = [logits]
  for t in range(4, tokens.shape[1]):
    logits, mutated = step({'params': params, 'cache': mutated['cache']}, tokens[:, t:t + 1])
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5, rtol=1e-5)


def test_scanned_parameters_carry_a_layers_axis():
  model = gpt.GPT(gpt.GPTConfig(**TINY, scan_layers=True))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(variables)['params']
  assert specs['blocks']['attention']['query']['kernel'] == jax.sharding.PartitionSpec(
      'layers', 'embed', 'heads', 'kv')


def test_unknown_remat_policy_names_the_field():
  with pytest.raises(ValueError, match='GPTConfig.remat'):
    gpt.GPTConfig(**TINY, remat='some')
