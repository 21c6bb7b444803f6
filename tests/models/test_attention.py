"""Tests of models/attention.py: exact masks, the equation, kernels and the KV cache."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from tests import tolerances

# Compiled once per shape: much faster on CPU than dispatching op by op.
attend = jax.jit(attention.attend, static_argnames=('score', 'kernel', 'dropout'))


def _normal(seed, shape, dtype=jnp.float32):
  # numpy draws: jax.random ops would each compile on first use, which dominates here.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _qkv(seed=0, batch=2, q_len=4, kv_len=5, heads=2, head_dim=3, dtype=jnp.float32):
  return (_normal(seed, (batch, q_len, heads, head_dim), dtype),
          _normal(seed + 1, (batch, kv_len, heads, head_dim), dtype),
          _normal(seed + 2, (batch, kv_len, heads, head_dim), dtype))


def _naive_attention(q, k, v, mask, bias=None, scale=True):
  """softmax(q·k/sqrt(H) + bias) v, one query position and head at a time."""
  q, k, v, mask = map(np.asarray, (q, k, v, mask))
  batch, q_len, heads, head_dim = q.shape
  out = np.zeros_like(q, dtype=np.float64)
  for b in range(batch):
    for t in range(q_len):
      for n in range(heads):
        visible = [s for s in range(k.shape[1]) if mask[b, 0, t, s]]
        if not visible:
          continue  # Padding row: zeros.
        logits = np.array([q[b, t, n] @ k[b, s, n] for s in visible], np.float64)
        if scale:
          logits /= np.sqrt(head_dim)
        if bias is not None:
          logits += np.asarray(bias)[b, n, t, visible]
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        out[b, t, n] = sum(w * v[b, s, n] for w, s in zip(weights, visible))
  return out


def _random_mask(seed, shape, fully_masked_row=(0, 1)):
  mask = np.random.default_rng(seed).random(shape) < 0.6
  mask[fully_masked_row[0], 0, fully_masked_row[1], :] = False
  return jnp.asarray(mask)


# ----------------------------------------------------------------------------- masks


def test_causal_mask_is_lower_triangular():
  mask = attention.causal_mask(attention.sequence_index(2, 4))
  assert mask.shape == (2, 1, 4, 4) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((4, 4), bool)))


def test_causal_mask_with_offset_against_a_cache():
  # Two new queries at cache slots 2 and 3, over a cache of 5 slots.
  mask = attention.causal_mask(attention.sequence_index(1, 2, 2), attention.sequence_index(1, 5))
  np.testing.assert_array_equal(mask[0, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_segment_mask_exact():
  mask = attention.segment_mask(jnp.array([[1, 1, 2, 0]]))
  expected = [[1, 1, 0, 0],
              [1, 1, 0, 0],
              [0, 0, 1, 0],
              [0, 0, 0, 0]]  # Padding (0) attends to nothing and is never attended to.
  np.testing.assert_array_equal(mask[0, 0], np.array(expected, bool))


def test_padding_mask_exact():
  mask = attention.padding_mask(jnp.array([[True, True, False]]))
  np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_causal_and_segment_masks_compose():
  segments = jnp.array([[1, 1, 1, 2, 2, 0]])
  mask = attention.causal_mask(attention.sequence_index(1, 6)) & attention.segment_mask(segments)
  expected = [[1, 0, 0, 0, 0, 0],
              [1, 1, 0, 0, 0, 0],
              [1, 1, 1, 0, 0, 0],
              [0, 0, 0, 1, 0, 0],
              [0, 0, 0, 1, 1, 0],
              [0, 0, 0, 0, 0, 0]]
  np.testing.assert_array_equal(mask[0, 0], np.array(expected, bool))


# ------------------------------------------------------------------ equation, kernels


@pytest.mark.parametrize('score', ['scaled_dot', 'dot'])
def test_xla_kernel_matches_naive_loop(score):
  q, k, v = _qkv()
  mask = _random_mask(1, (2, 1, 4, 5))
  bias = _normal(2, (2, 2, 4, 5))
  out = attend(q, k, v, mask_B1TS=mask, bias_BNTS=bias, score=score, kernel='xla')
  expected = _naive_attention(q, k, v, mask, bias, scale=(score == 'scaled_dot'))
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  q, k, v = _qkv()
  mask = jnp.zeros((2, 1, 4, 5), bool)
  for kernel in attention.KERNELS:
    out = attend(q, k, v, mask_B1TS=mask, kernel=kernel)
    np.testing.assert_array_equal(out, np.zeros_like(out))
  grads = jax.jit(jax.grad(lambda q: attention.attend(q, k, v, mask_B1TS=mask).sum()))(q)
  assert np.isfinite(grads).all()


@pytest.mark.parametrize('score', ['scaled_dot', 'dot'])
def test_cudnn_kernel_on_cpu_is_xla_dot_product_attention_equal_to_einsum(score):
  """On CPU kernel='cudnn' runs jax.nn.dot_product_attention's XLA version, not cuDNN.

  This checks how the kernel is called (mask, bias, score scaling) against our einsum; it
  compares XLA with XLA. The comparison with cuDNN itself is the gpu-marked
  test_cudnn_kernel_on_gpu_equals_xla_kernel.
  """
  q, k, v = _qkv(3)
  mask = _random_mask(3, (2, 1, 4, 5))
  bias = _normal(4, (2, 2, 4, 5))
  xla = attend(q, k, v, mask_B1TS=mask, bias_BNTS=bias, score=score, kernel='xla')
  dpa = attend(q, k, v, mask_B1TS=mask, bias_BNTS=bias, score=score, kernel='cudnn')
  tolerances.assert_close(dpa, xla, rtol=1e-6)


@pytest.mark.gpu
def test_cudnn_kernel_on_gpu_equals_xla_kernel():
  assert jax.default_backend() == 'gpu'
  q, k, v = _qkv(batch=2, q_len=64, kv_len=64, heads=4, head_dim=64, dtype=jnp.bfloat16)
  mask = attention.causal_mask(attention.sequence_index(2, 64))
  assert attention._cudnn_unsupported(q) is None
  xla = attention.attend(q, k, v, mask_B1TS=mask, kernel='xla')
  cudnn = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask_B1TS=mask, kernel='cudnn'))(
      q, k, v)
  np.testing.assert_allclose(np.asarray(cudnn, np.float32), np.asarray(xla, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_cudnn_kernel_refuses_what_it_cannot_do():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match='dropout'):
    attention.attend(q, k, v, kernel='cudnn', dropout=lambda p: p)
  with pytest.raises(ValueError, match="unknown attention kernel 'flash9'"):
    attention.attend(q, k, v, kernel='flash9')
  with pytest.raises(ValueError, match="unknown attention score 'cosine'"):
    attention.attend(q, k, v, score='cosine')


# ---------------------------------------------------------------------------- module


def _mha(**kwargs):
  return attention.MultiHeadAttention(num_heads=2, head_dim=3, **kwargs)


@pytest.mark.parametrize('cross', [False, True])
def test_module_matches_naive_projections_and_loop(cross):
  x = _normal(0, (2, 4, 6))
  kv = _normal(1, (2, 5, 6)) if cross else None  # Cross-attention: S=5 keys for T=4 queries.
  mask = _random_mask(5, (2, 1, 4, 5 if cross else 4))
  module = _mha()
  rng = jax.random.key(1, impl='rbg')
  params = nn.unbox(jax.jit(module.init)(rng, x, kv, mask_B1TS=mask))['params']
  out = jax.jit(module.apply)({'params': params}, x, kv, mask_B1TS=mask)

  def project(name, inputs):
    return np.einsum('btd,dnh->btnh', inputs, params[name]['kernel']) + params[name]['bias']

  source = x if kv is None else kv
  heads = _naive_attention(project('query', x), project('key', source),
                           project('value', source), mask)
  expected = np.einsum('btnh,nhd->btd', heads, params['out']['kernel']) + params['out']['bias']
  assert out.shape == (2, 4, 6)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_module_parameters_carry_logical_axes():
  variables = jax.eval_shape(_mha().init, jax.random.key(0), jnp.ones((1, 3, 6)))
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['query']['kernel']) == ('embed', 'heads', 'kv')
  assert tuple(specs['out']['kernel']) == ('heads', 'kv', 'embed')


def test_module_dropout_only_when_not_deterministic():
  x = _normal(0, (1, 5, 6))
  module = _mha(dropout_rate=0.5)
  variables = jax.jit(module.init)(jax.random.key(1, impl='rbg'), x)
  apply = jax.jit(module.apply, static_argnames='deterministic')
  eval_a = apply(variables, x)
  eval_b = apply(variables, x, deterministic=True)
  train = apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(2, impl='rbg')})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train, eval_a)


def test_cache_decoding_equals_masked_full_attention():
  # Left-padded rows (segment 0 = padding), a chunk of 3, then single tokens.
  batch, length = 2, 7
  x = _normal(0, (batch, length, 6))
  segments = jnp.array([[1] * length, [0, 0] + [1] * (length - 2)])
  module = _mha()
  variables = jax.jit(functools.partial(module.init, decode=True))(jax.random.key(1, impl='rbg'), x)
  assert variables['cache']['cached_key'].shape == (batch, 2, length, 3)  # [B, N, S, H]
  assert not variables['cache']['cached_key'].any()

  mask = attention.causal_mask(attention.sequence_index(batch, length))
  mask &= attention.segment_mask(segments)
  full = jax.jit(module.apply)({'params': variables['params']}, x, mask_B1TS=mask)

  decode = jax.jit(functools.partial(module.apply, decode=True, mutable=['cache']))
  cache = variables['cache']
  outputs = []
  for start, stop in [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]:
    out, mutated = decode({'params': variables['params'], 'cache': cache}, x[:, start:stop],
                          segment_ids_BT=segments[:, start:stop])
    cache = mutated['cache']
    outputs.append(out)
  assert int(cache['cache_index']) == length
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=1e-5, rtol=1e-5)


def test_decode_rejects_a_mask():
  x = jnp.ones((1, 3, 6))
  with pytest.raises(ValueError, match='segment_ids_BT'):
    _mha().init(jax.random.key(0), x, mask_B1TS=jnp.ones((1, 1, 3, 3), bool), decode=True)
