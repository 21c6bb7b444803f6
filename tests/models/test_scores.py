"""Tests of the attention scores: each against its equation, per head == fused, decoding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models import gpt
from tests.tolerances import assert_close

SCORES = ['scaled_dot', 'dot', 'general', 'additive']


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _naive_score(name, params, q_h, k_h, n):
  """One logit from one query and one key vector of head n, written from the equation."""
  head_dim = q_h.shape[0]
  if name == 'scaled_dot':
    return q_h @ k_h / np.sqrt(head_dim)
  if name == 'dot':
    return q_h @ k_h
  if name == 'general':  # q·W·k
    return q_h @ np.asarray(params['kernel'])[n] @ k_h
  if name == 'additive':  # vᵀ·tanh(W·q + U·k)
    w, u, v = (np.asarray(params[key])[n] for key in ('query_kernel', 'key_kernel', 'vector'))
    return v @ np.tanh(q_h @ w + k_h @ u)
  raise ValueError(name)


def _random_params(module, q, k):
  """The score's parameters, redrawn at random so no initializer hides a mistake."""
  params = nn.unbox(module.init(jax.random.key(0), q, k)).get('params', {})
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [_normal(10 + i, x.shape) for i, x in enumerate(leaves)])


@pytest.mark.parametrize('name', SCORES)
def test_score_matches_naive_loop(name):
  q, k = _normal(0, (2, 3, 2, 4)), _normal(1, (2, 5, 2, 4))
  module = attention.build_score(name)
  params = _random_params(module, q, k)
  logits = jax.jit(module.apply)({'params': params}, q, k)
  assert logits.shape == (2, 2, 3, 5) and logits.dtype == jnp.float32
  expected = np.zeros(logits.shape)
  for b in range(2):
    for n in range(2):
      for t in range(3):
        for s in range(5):
          expected[b, n, t, s] = _naive_score(name, params, np.asarray(q[b, t, n]),
                                              np.asarray(k[b, s, n]), n)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_parametric_scores_have_per_head_parameters_and_axes():
  q = jnp.ones((1, 3, 2, 4))
  general = attention.build_score('general').init(jax.random.key(0), q, q)['params']
  assert general['kernel'].value.shape == (2, 4, 4)
  assert tuple(nn.get_partition_spec(general)['kernel']) == ('heads', 'kv', None)
  # It starts as the scaled dot product.
  np.testing.assert_allclose(
      attention.build_score('general').apply(nn.unbox({'params': general}), q, q),
      attention.get_score('scaled_dot')(q, q), rtol=1e-6)
  additive = attention.build_score('additive', features=6).init(jax.random.key(0), q, q)
  shapes = jax.tree.map(jnp.shape, nn.unbox(additive['params']))
  assert shapes == {'query_kernel': (2, 4, 6), 'key_kernel': (2, 4, 6), 'vector': (2, 6)}


def test_additive_score_on_keys_projected_once_equals_projecting_them_itself():
  # A recurrent decoder projects the keys U·k once per source and passes them in.
  q, k = _normal(0, (2, 3, 2, 4)), _normal(1, (2, 5, 2, 4))
  full = attention.build_score('additive')
  params = _random_params(full, q, k)
  uk = jnp.einsum('bsnh,nha->bsna', k, params['key_kernel'])
  projected = attention.build_score('additive', project_keys=False)
  held = {name: params[name] for name in ('query_kernel', 'vector')}
  assert set(nn.unbox(projected.init(jax.random.key(0), q, uk))['params']) == set(held)
  assert_close(projected.apply({'params': held}, q, uk), full.apply({'params': params}, q, k))
  with pytest.raises(ValueError, match='features=6 wide, got 4'):
    attention.build_score('additive', features=6, project_keys=False).init(
        jax.random.key(0), q, k)


def test_cudnn_kernel_refuses_parametric_scores():
  q = jnp.ones((1, 3, 2, 4))
  module = attention.build_score('general')
  params = module.init(jax.random.key(0), q, q)

  def run(q):
    return attention.attend(q, q, q, score=module.bind(params), kernel='cudnn')

  with pytest.raises(ValueError, match='dot-product scores only'):
    run(q)


def _naive_attention(name, params, q, k, v, mask):
  """softmax(score) · v, one query and head at a time."""
  q, k, v, mask = map(np.asarray, (q, k, v, mask))
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      for n in range(q.shape[2]):
        visible = [s for s in range(k.shape[1]) if mask[b, 0, t, s]]
        logits = np.array([_naive_score(name, params, q[b, t, n], k[b, s, n], n)
                           for s in visible])
        weights = np.exp(logits - logits.max())
        out[b, t, n] = (weights / weights.sum()) @ v[b, visible, n]
  return out


@pytest.mark.parametrize('name', SCORES)
def test_module_per_head_projections_equal_fused(name):
  # Attention built head by head, with per-head Dense layers cut from the fused kernels,
  # equals the module's fused projections, for every score.
  heads, head_dim, width = 2, 3, 6
  x = _normal(0, (2, 5, width))
  mask = attention.causal_mask(attention.sequence_index(2, 5))
  module = attention.MultiHeadAttention(num_heads=heads, head_dim=head_dim, score=name)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(1), x, mask_B1TS=mask))['params']
  if 'score' in params:  # Random, not the initial identity.
    leaves, tree = jax.tree.flatten(params['score'])
    params['score'] = jax.tree.unflatten(
        tree, [_normal(20 + i, a.shape) for i, a in enumerate(leaves)])
  fused = jax.jit(module.apply)({'params': params}, x, mask_B1TS=mask)

  per_head = []
  for n in range(heads):
    dense = {key: {'kernel': params[key]['kernel'][:, n:n + 1],
                   'bias': params[key]['bias'][n:n + 1]} for key in ('query', 'key', 'value')}
    projected = [nn.Dense(head_dim).apply(
        {'params': {'kernel': p['kernel'][:, 0], 'bias': p['bias'][0]}}, x)[:, :, None]
                 for p in dense.values()]
    score_params = jax.tree.map(lambda a: a[n:n + 1], params.get('score', {}))
    score = attention.build_score(name).bind({'params': score_params} if score_params else {})
    per_head.append(attention.attend(*projected, mask_B1TS=mask, score=score))
    # The same head through the naive loop of its equation.
    np.testing.assert_allclose(per_head[-1], _naive_attention(name, score_params, *projected,
                                                              mask), atol=1e-5, rtol=1e-5)
  heads_BTNH = jnp.concatenate(per_head, axis=2)
  out = jnp.einsum('btnh,nhd->btd', heads_BTNH, params['out']['kernel']) + params['out']['bias']
  np.testing.assert_allclose(fused, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['general', 'additive'])
def test_gpt_decoding_with_each_score_equals_full_forward(name):
  config = gpt.GPTConfig(vocab_size=32, max_len=12, num_layers=1, num_heads=2, embed_dim=8,
                         mlp_dim=16, attention=name)
  model = gpt.GPT(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 7)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl='rbg'), tokens))['params']
  assert 'score' in params['block_0']['attention']
  full = jax.jit(model.apply)({'params': params}, tokens)
  cache = jax.jit(functools.partial(model.init, decode=True))(
      jax.random.key(0, impl='rbg'), jnp.zeros((2, 12), jnp.int32))['cache']
  step = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
  chunks = []
  for start, stop in [(0, 3), (3, 4), (4, 5), (5, 7)]:
    logits, mutated = step({'params': params, 'cache': cache}, tokens[:, start:stop])
    cache = mutated['cache']
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5, rtol=1e-5)
