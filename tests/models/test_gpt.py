"""Tests of models/gpt.py: shapes, jit, dtypes, causality, packing, KV cache, config."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import gpt
from models import layers
from models import transformer

TINY = dict(vocab_size=32, max_len=16, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32)


def _init(config, batch=2, length=8, seed=0):
  model = gpt.GPT(config)
  tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))
  tokens = jnp.asarray(tokens, jnp.int32)
  # 'rbg' keys: their random ops compile much faster on CPU than threefry's.
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed, impl='rbg'), tokens))['params']
  return model, params, tokens


@functools.cache
def _jit_apply(model):
  """One jitted apply per model, so tests share its compilations."""
  return jax.jit(model.apply)


@pytest.fixture(scope='module')
def tiny():
  return _init(gpt.GPTConfig(**TINY))


def test_shapes_finite_and_same_with_jit(tiny):
  model, params, tokens = tiny
  logits = model.apply({'params': params}, tokens)
  assert logits.shape == (2, 8, 32) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  jitted = _jit_apply(model)({'params': params}, tokens)
  np.testing.assert_allclose(jitted, logits, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params, tokens = _init(gpt.GPTConfig(**TINY, dtype='bfloat16'))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = _jit_apply(model)({'params': params}, tokens)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  # Same parameters in float32 give nearly the same logits.
  reference = _jit_apply(gpt.GPT(gpt.GPTConfig(**TINY)))({'params': params}, tokens)
  np.testing.assert_allclose(logits, reference, atol=5e-2)


def test_causal_by_gradient(tiny):
  model, params, tokens = tiny
  length, width = tokens.shape[1], TINY['embed_dim']
  weights = np.random.default_rng(7).normal(size=(length, TINY['vocab_size']))
  weights = jnp.asarray(weights, jnp.float32)

  def outputs_from_embeddings(x_TD):
    # Swaps the token embedding's output for x, so gradients flow to the inputs.
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.Embed) and context.method_name == '__call__':
        return x_TD[None]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits = model.apply({'params': params}, tokens[:1])
    return jnp.sum(logits[0] * weights, axis=-1)  # One scalar per position.

  x = jnp.asarray(np.random.default_rng(8).normal(size=(length, width)), jnp.float32)
  jacobian = jax.jit(jax.jacrev(outputs_from_embeddings))(x)  # [t, t', D]
  influence = np.abs(np.asarray(jacobian)).sum(-1)
  future = np.triu(np.ones((length, length), bool), k=1)
  assert (influence[future] == 0).all()  # Exact zeros, not just small.
  assert (influence[~future] > 0).all()


def test_packed_documents_do_not_see_each_other(tiny):
  model, params, _ = tiny
  doc_a = jnp.array([3, 1, 4, 1, 5])
  doc_b = jnp.array([9, 2, 6, 5])
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros(3, jnp.int32)])[None]
  segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
  apply = _jit_apply(model)
  logits = apply({'params': params}, packed, segment_ids_BT=segments, positions_BT=positions)
  alone_a = apply({'params': params}, doc_a[None])
  alone_b = apply({'params': params}, doc_b[None])
  np.testing.assert_allclose(logits[0, :5], alone_a[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[0, 5:9], alone_b[0], atol=1e-5, rtol=1e-5)
  assert np.isfinite(logits).all()  # Padding rows included.
  # Without segment ids the second document would see the first.
  mixed = apply({'params': params}, packed, positions_BT=positions)
  assert not np.allclose(mixed[0, 5:9], alone_b[0], atol=1e-3)


def test_dropout_changes_training_outputs_only():
  model, params, tokens = _init(gpt.GPTConfig(**TINY, dropout_rate=0.3))

  @jax.jit
  def eval_eval_train(rng):
    def apply(**kwargs):
      return model.apply({'params': params}, tokens, **kwargs)
    return apply(), apply(deterministic=True), apply(deterministic=False, rngs={'dropout': rng})

  eval_a, eval_b, train = eval_eval_train(jax.random.key(1, impl='rbg'))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train, eval_a)


def test_kv_cache_decoding_equals_full_forward(tiny):
  model, params, tokens = tiny
  batch, length = tokens.shape
  full = _jit_apply(model)({'params': params}, tokens)
  init = jax.jit(functools.partial(model.init, decode=True))
  dummy = jnp.zeros((batch, TINY['max_len']), jnp.int32)
  cache = init(jax.random.key(0, impl='rbg'), dummy)['cache']
  assert not any(leaf.any() for leaf in jax.tree.leaves(cache))
  step = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
  logits, mutated = step({'params': params, 'cache': cache}, tokens[:, :3])  # Prefill.
  chunks = [logits]
  for t in range(3, length):
    logits, mutated = step({'params': params, 'cache': mutated['cache']}, tokens[:, t:t + 1])
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5, rtol=1e-5)
  assert int(mutated['cache']['position_index']) == length


def test_gpt2_initialisation_scales_residual_projections():
  config = gpt.GPTConfig(**{**TINY, 'num_layers': 8, 'embed_dim': 64, 'num_heads': 4})
  block = transformer.Block(config, config.mask_pattern)
  init = jax.jit(functools.partial(block.init, mask_B1TS=None, segment_ids_BT=None,
                                   deterministic=True, decode=False))
  params = nn.unbox(init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 4, 64))))['params']
  assert np.std(params['attention']['query']['kernel']) == pytest.approx(0.02, rel=0.1)
  residual_std = 0.02 / np.sqrt(2 * 8)
  assert np.std(params['attention']['out']['kernel']) == pytest.approx(residual_std, rel=0.1)
  assert np.std(params['mlp']['fc_out']['kernel']) == pytest.approx(residual_std, rel=0.1)
  assert not params['mlp']['fc_in']['bias'].any()


def test_parameters_carry_logical_axes():
  model = gpt.GPT(gpt.GPTConfig(**TINY))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['token_embed']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['block_0']['mlp']['fc_in']['kernel']) == ('embed', 'mlp')


@pytest.mark.parametrize('change, field', [
    (dict(num_heads=3), 'num_heads'),
    (dict(embed_dim=0), 'embed_dim'),
    (dict(vocab_size=-1), 'vocab_size'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
    (dict(dtype='int32'), 'dtype'),
    (dict(param_dtype='float33'), 'param_dtype'),
    (dict(attention='cosine'), 'attention'),
    (dict(kernel='flash9'), 'kernel'),
    (dict(position='spiral'), 'position'),
])
def test_config_validation_names_the_field(change, field):
  with pytest.raises(ValueError, match=f'GPTConfig.{field}'):
    gpt.GPTConfig(**{**TINY, **change})


def test_registry_builds_from_a_config_dict():
  config_cls, model_cls = models.get('gpt')
  config = config_cls(**TINY)
  assert model_cls is gpt.GPT and dataclasses.is_dataclass(config) and config.head_dim == 8
  with pytest.raises(ValueError, match='unknown model'):
    models.get('gpt5')
