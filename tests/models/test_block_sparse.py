"""Tests of models/block_sparse.py: equal to dense attention under the same mask."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models import block_sparse
from models import gpt

index = attention.sequence_index
PATTERNS = {
    'bigbird': attention.BigBirdMask(block_size=4, window_blocks=1, global_blocks=1,
                                     random_blocks=1, seed=2),
    'bigbird_causal': attention.BigBirdMask(block_size=4, window_blocks=1, global_blocks=1,
                                            random_blocks=1, seed=2, causal=True),
    'sliding_window': attention.SlidingWindowMask(window=5, block_size=4),
    'sliding_window_causal': attention.SlidingWindowMask(window=5, causal=True),
}


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.partial(jax.jit, static_argnames=('kernel', 'pattern', 'score'))
def _attend(q, k, v, mask, bias, *, kernel, pattern, score='scaled_dot'):
  return attention.attend(q, k, v, mask_B1TS=mask, bias_BNTS=bias, kernel=kernel,
                          pattern=pattern, score=score)


def test_plan_computes_only_kept_blocks():
  layout = PATTERNS['bigbird'].block_layout(10, 10)
  dense_rows, sparse_rows, blocks, real = block_sparse._gather_plan(layout)
  np.testing.assert_array_equal(dense_rows, [0])  # The global block sees everything.
  assert blocks.shape == (9, 5)  # 3 window + 1 global + 1 random, not 10.
  for row, kept, ok in zip(sparse_rows, blocks, real):
    np.testing.assert_array_equal(np.sort(kept[ok]), np.flatnonzero(layout[row]))
  # Columns: the window's 3 diagonals (slices of the keys), the global block (a
  # broadcast), and only the random blocks gathered by index.
  offsets_KR = (sparse_rows[:, None] - blocks).T
  assert {int(d[0]) for d in offsets_KR if (d == d[0]).all()} == {-1, 0, 1}
  assert (blocks == 0).all(axis=0).sum() == 1


@pytest.mark.parametrize('name', sorted(PATTERNS))
@pytest.mark.parametrize('num_blocks', [1, 2, 3, 10, 33])
def test_plan_keeps_every_block_once_and_is_no_wider(name, num_blocks):
  layout = PATTERNS[name].block_layout(num_blocks, num_blocks)
  dense_rows, sparse_rows, blocks, real = block_sparse._gather_plan(layout)
  np.testing.assert_array_equal(np.sort(np.concatenate([dense_rows, sparse_rows])),
                                np.arange(num_blocks))
  for row, kept, ok in zip(sparse_rows, blocks, real):
    np.testing.assert_array_equal(np.sort(kept[ok]), np.flatnonzero(layout[row]))
  assert blocks.shape[1] <= max(layout[sparse_rows].sum(axis=1).max(initial=0), 1)


def test_plan_of_scattered_blocks_packs_them():
  layout = np.zeros((8, 20), bool)  # One block per row, at two alternating offsets.
  layout[np.arange(8), np.arange(8) + 5 * (np.arange(8) % 2)] = True
  _, _, blocks, real = block_sparse._gather_plan(layout)
  assert blocks.shape == (8, 1) and real.all()


def _primitives(jaxpr):
  yield from (eqn.primitive.name for eqn in jaxpr.eqns)
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _primitives(sub)


@pytest.mark.parametrize('name', ['sliding_window', 'sliding_window_causal', 'bigbird_causal'])
def test_backward_scatters_only_gathered_blocks(name):
  """A window's key blocks are slices (gradients: pads), not gathers (scatter-adds)."""
  pattern = PATTERNS[name]
  q = _normal(0, (2, 40, 2, 3))

  def loss(q, k, v):
    return jnp.sum(attention.attend(q, k, v, kernel='block_sparse', pattern=pattern))

  primitives = list(_primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr))
  gathers = primitives.count('gather')
  scatters = sum(p.startswith('scatter') for p in primitives)
  if name.startswith('sliding_window'):
    assert gathers == scatters == 0, primitives
  else:  # BigBird: the random blocks of keys and values only.
    assert gathers == 2 and scatters == 2, primitives


@pytest.mark.parametrize('name', sorted(PATTERNS))
@pytest.mark.parametrize('length', [40, 38])  # 38: not a whole number of blocks.
def test_equals_dense_attention_under_the_same_mask(name, length):
  pattern = PATTERNS[name]
  q, k, v = (_normal(i, (2, length, 2, 3)) for i in range(3))
  bias = _normal(3, (2, 2, length, length))
  segments = np.ones((2, length), np.int32)
  segments[0, 25:] = 2  # Two packed documents in row 0, padding at the end of row 1.
  segments[1, -6:] = 0
  mask = pattern(index(2, length)) & attention.segment_mask(jnp.asarray(segments))
  dense = _attend(q, k, v, mask, bias, kernel='xla', pattern=None)
  sparse = _attend(q, k, v, mask, bias, kernel='block_sparse', pattern=pattern)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)
  # Without a dense mask the pattern alone masks.
  alone = _attend(q, k, v, None, None, kernel='block_sparse', pattern=pattern)
  expected = _attend(q, k, v, pattern(index(2, length)), None, kernel='xla', pattern=None)
  np.testing.assert_allclose(alone, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(PATTERNS))
def test_gradients_equal_dense(name):
  pattern = PATTERNS[name]
  q, k, v = (_normal(i, (2, 38, 2, 3)) for i in range(3))
  mask = pattern(index(2, 38))

  def loss(kernel, q, k, v):
    out = attention.attend(q, k, v, mask_B1TS=mask, kernel=kernel, pattern=pattern)
    return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size)

  dense = jax.jit(jax.grad(functools.partial(loss, 'xla'), argnums=(0, 1, 2)))(q, k, v)
  sparse = jax.jit(jax.grad(functools.partial(loss, 'block_sparse'), argnums=(0, 1, 2)))(q, k, v)
  for d, s in zip(dense, sparse):
    np.testing.assert_allclose(s, d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['bigbird_causal', 'sliding_window'])
def test_bfloat16_rounds_once_as_dense_does(name):
  pattern = PATTERNS[name]
  q, k, v = (_normal(i, (2, 37, 2, 8)).astype(jnp.bfloat16) for i in range(3))
  dense = _attend(q, k, v, pattern(index(2, 37)), None, kernel='xla', pattern=None)
  sparse = _attend(q, k, v, None, None, kernel='block_sparse', pattern=pattern)
  assert sparse.dtype == jnp.bfloat16
  # Summing the key block columns' products in bfloat16 would round most outputs twice.
  assert np.mean(np.asarray(sparse != dense)) < 0.01


def test_additive_score_runs_on_blocks():
  pattern = PATTERNS['sliding_window_causal']
  q, k, v = (_normal(i, (1, 20, 2, 3)) for i in range(3))
  score = attention.build_score('additive')
  score = score.bind(score.init(jax.random.key(0), q, k))
  mask = pattern(index(1, 20))
  dense = attention.attend(q, k, v, mask_B1TS=mask, score=score)
  sparse = attention.attend(q, k, v, mask_B1TS=mask, score=score, kernel='block_sparse',
                            pattern=pattern)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)


def test_needs_a_block_structured_pattern():
  q = jnp.ones((1, 8, 1, 2))
  with pytest.raises(ValueError, match='block-structured'):
    attention.attend(q, q, q, kernel='block_sparse', pattern=attention.CausalMask())


TINY = dict(vocab_size=32, max_len=24, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32,
            mask='bigbird', block_size=4, window_blocks=1, global_blocks=1, random_blocks=1)


def test_gpt_block_sparse_equals_xla_and_decodes():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 22)), jnp.int32)
  model = gpt.GPT(gpt.GPTConfig(**TINY, kernel='block_sparse'))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl='rbg'), tokens))['params']
  sparse = jax.jit(model.apply)({'params': params}, tokens)
  dense = jax.jit(gpt.GPT(gpt.GPTConfig(**TINY)).apply)({'params': params}, tokens)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)

  # The KV cache attends densely over the cache under the same mask.
  cache = jax.jit(functools.partial(model.init, decode=True))(
      jax.random.key(0, impl='rbg'), jnp.zeros((2, 24), jnp.int32))['cache']
  step = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
  outputs = []
  for start, stop in [(0, 9), (9, 10), (10, 17), (17, 18), (18, 22)]:
    logits, mutated = step({'params': params, 'cache': cache}, tokens[:, start:stop])
    cache = mutated['cache']
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), sparse, atol=1e-5, rtol=1e-5)
