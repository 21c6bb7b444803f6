"""Tests of models/layers.py and models/positions.py against their formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models import positions
from tests import tolerances


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init_apply(module, *args, method=None, **kwargs):
  variables = jax.jit(module.init)(jax.random.key(0, impl='rbg'), *args, **kwargs)
  out = jax.jit(module.apply, static_argnames='method')(variables, *args, method=method,
                                                       **kwargs)
  return nn.unbox(variables)['params'], out


def test_layer_norm_formula_and_dtype():
  x = _normal(1, (2, 3, 8)) * 4 + 1
  params, out = _init_apply(layers.LayerNorm(epsilon=1e-5), x)
  mean = x.mean(-1, keepdims=True)
  expected = (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert set(params) == {'scale', 'bias'}
  _, out_bf16 = _init_apply(layers.LayerNorm(dtype=jnp.bfloat16), x)
  assert out_bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize('use_bias', [True, False])
def test_layer_norm_gradient_equals_autodiff_of_its_formula(use_bias):
  # The hand-written backward against jax's derivative of the plain formula, for x, scale
  # and bias, with a non-trivial cotangent and a scale/bias away from their init.
  x, dy = _normal(2, (3, 5, 16)) * 3 + 0.5, _normal(3, (3, 5, 16))
  scale, bias = 1 + 0.5 * _normal(4, (16,)), _normal(5, (16,)) if use_bias else None

  def formula(x, scale, bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale
    return y if bias is None else y + bias

  ours = lambda x, scale, bias: layers.layer_norm(x, scale, bias, 1e-5)
  out, vjp = jax.vjp(ours, x, scale, bias)
  expected_out, expected_vjp = jax.vjp(formula, x, scale, bias)
  np.testing.assert_allclose(out, expected_out, atol=1e-5)
  for got, want in zip(vjp(dy), expected_vjp(dy)):
    if want is None:
      assert got is None
    else:
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # And through the module, bfloat16 in and out: gradients reach x in x's dtype.
  module = layers.LayerNorm(dtype=jnp.bfloat16, use_bias=use_bias)
  variables = module.init(jax.random.key(0), x.astype(jnp.bfloat16))
  dx = jax.grad(lambda x: module.apply(variables, x).astype(jnp.float32).sum())(
      x.astype(jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def test_mlp_formula():
  x = _normal(1, (2, 3, 8))
  params, out = _init_apply(layers.Mlp(hidden_dim=16), x)
  hidden = jax.nn.gelu(x @ params['fc_in']['kernel'] + params['fc_in']['bias'], approximate=True)
  expected = hidden @ params['fc_out']['kernel'] + params['fc_out']['bias']
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_embed_lookup_and_tied_attend_in_float32():
  """bfloat16 activations, float32 table; attend sums bfloat16 products in float32."""
  embed = layers.Embed(num_embeddings=10, features=4, dtype=jnp.bfloat16)
  ids = jnp.array([[1, 7, 7]])
  params, vectors = _init_apply(embed, ids)
  table = params['embedding']
  assert table.dtype == jnp.float32 and vectors.dtype == jnp.bfloat16
  # The lookup is the table's rows rounded to bfloat16, exactly.
  np.testing.assert_array_equal(np.asarray(vectors, np.float32),
                                np.asarray(table[ids].astype(jnp.bfloat16), np.float32))
  x = _normal(2, (1, 3, 4))
  logits = jax.jit(embed.apply, static_argnames='method')(
      {'params': params}, x, method=layers.Embed.attend)
  assert logits.shape == (1, 3, 10) and logits.dtype == jnp.float32
  # Products of bfloat16 numbers are exact in float32; only the order of the sum may differ.
  as_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float32)
  expected = as_bf16(x) @ as_bf16(table).T
  tolerances.assert_close(logits, expected, rtol=1e-6, scale=1e-6)
  # Operands left in float32 would be off by far more: the comparison can tell them apart.
  unrounded = np.asarray(x) @ np.asarray(table).T
  assert np.abs(unrounded - expected).max() > 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_tied_logits_gradient_equals_autodiff_of_the_einsum(dtype):
  # The hand-written backward against jax's derivative of the plain einsum, for both the
  # activations and the table, with a non-trivial cotangent; in bfloat16 the gradients keep
  # their inputs' dtypes (the float32 logit gradients are rounded to bfloat16 first, as
  # mixed precision does, hence the looser bound there).
  x, table = _normal(1, (2, 5, 8)).astype(dtype), _normal(2, (11, 8)).astype(dtype)
  dlogits = _normal(3, (2, 5, 11))
  plain = lambda x, t: jnp.einsum('btd,vd->btv', x, t, preferred_element_type=jnp.float32)
  out, vjp = jax.vjp(layers.tied_logits, x, table)
  expected_out, expected_vjp = jax.vjp(plain, x, table)
  np.testing.assert_array_equal(out, expected_out)
  for got, want in zip(vjp(dlogits), expected_vjp(dlogits)):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tolerances.assert_close(np.asarray(got, np.float32), np.asarray(want, np.float32),
                            **(dict(rtol=1e-2, scale=1e-2) if dtype == jnp.bfloat16 else {}))


def _plain_feed_forward(x, w_in, b_in, w_gate, b_gate, w_out, b_out, activation):
  """The MLP as two dense layers and the activation, for autodiff to differentiate."""
  plus = lambda v, b: v if b is None else v + b
  h = layers.activation(activation)(plus(x @ w_in, b_in))
  if w_gate is not None:
    h = h * plus(x @ w_gate, b_gate)
  return plus(h @ w_out, b_out)


@pytest.mark.parametrize('activation,use_bias,dtype', [
    ('geglu_tanh', False, jnp.float32), ('gelu', True, jnp.float32),
    ('relu', True, jnp.float32), ('swiglu', True, jnp.bfloat16)])
def test_feed_forward_gradient_equals_autodiff(activation, use_bias, dtype):
  # Every input's gradient (x, the three kernels, the three biases) against autodiff of the
  # plain composition, with a non-trivial cotangent and leading dims [B, T].
  d, f = 8, 12
  gated = layers.is_gated(activation)
  args = [_normal(1, (2, 5, d)), _normal(2, (d, f)), _normal(3, (f,)) if use_bias else None,
          _normal(4, (d, f)) if gated else None,
          _normal(5, (f,)) if gated and use_bias else None, _normal(6, (f, d)),
          _normal(7, (d,)) if use_bias else None]
  args = [None if a is None else a.astype(dtype) for a in args]
  dy = _normal(8, (2, 5, d)).astype(dtype)
  out, vjp = jax.vjp(lambda *a: layers.feed_forward(*a, activation=activation), *args)
  want_out, want_vjp = jax.vjp(lambda *a: _plain_feed_forward(*a, activation), *args)
  loose = dict(rtol=2e-2, scale=2e-2) if dtype == jnp.bfloat16 else {}
  tolerances.assert_close(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                          **loose)
  for got, want in zip(vjp(dy), want_vjp(dy)):
    if want is None:
      assert got is None
      continue
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tolerances.assert_close(np.asarray(got, np.float32), np.asarray(want, np.float32),
                            **loose)


def test_mlp_keeps_dense_parameter_names():
  # Checkpoints and the Hugging Face maps read fc_in/fc_gate/fc_out {kernel, bias}.
  module = layers.Mlp(hidden_dim=6, activation='geglu')
  variables = module.init(jax.random.key(0), jnp.ones((1, 3, 4)))
  shapes = jax.tree_util.tree_map(jnp.shape, nn.meta.unbox(variables['params']))
  assert shapes == {'fc_in': {'kernel': (4, 6), 'bias': (6,)},
                    'fc_gate': {'kernel': (4, 6), 'bias': (6,)},
                    'fc_out': {'kernel': (6, 4), 'bias': (4,)}}
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['fc_in']['kernel']) == ('embed', 'mlp')
  assert tuple(specs['fc_out']['kernel']) == ('mlp', 'embed')


def test_learned_positions_look_up_explicit_positions():
  module = positions.LearnedPositions(max_len=6, features=4)
  restart = jnp.array([[0, 1, 2, 0, 1]])  # A second packed document restarts at 0.
  params, out = _init_apply(module, restart)
  np.testing.assert_array_equal(out[0], params['embedding'][restart[0]])
  specs = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(0), restart))
  assert tuple(specs['params']['embedding']) == ('length', 'embed')


def test_position_registry():
  with pytest.raises(ValueError, match="unknown position encoding 'spiral'"):
    positions.get('spiral')
  positions.register('learned_copy', positions.Learned)
  try:
    assert positions.get('learned_copy') is positions.Learned
  finally:
    del positions.POSITIONS['learned_copy']
