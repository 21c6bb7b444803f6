"""Tests of models/positions.py and models/relative.py: each scheme against its equation,
then GPT with each scheme (causality, packing, KV-cache decoding, left-padded prompts)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models import gpt
from models import layers
from models import positions
from models import relative

SCHEMES = ('none', 'learned', 'sinusoidal', 'rope', 'alibi', 't5', 'shaw', 'deberta')
# Small relative settings, so that the tests' distances reach the clipped and log buckets.
TINY = dict(vocab_size=32, max_len=16, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32,
            relative_window=2, relative_buckets=8, relative_max_distance=8)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _context(q_positions, kv_positions=None, shared=None):
  q = jnp.asarray(q_positions, jnp.int32)
  kv = q if kv_positions is None else jnp.asarray(kv_positions, jnp.int32)
  return relative.PositionContext(q, kv, shared)


def _softmax_rows(logits, visible):
  """Softmax over the visible entries of a 1-D row; zeros if none is visible."""
  out = np.zeros_like(logits)
  if visible.any():
    e = np.exp(logits[visible] - logits[visible].max())
    out[visible] = e / e.sum()
  return out


# --------------------------------------------------------------------- the equations


def test_sinusoidal_values_by_hand():
  pe = np.asarray(positions.sinusoidal(jnp.array([[0, 1, 3]]), features=4))
  # D=4: wavelengths 1 and 10000^(2/4) = 100.
  for t, p in enumerate([0, 1, 3]):
    np.testing.assert_allclose(pe[0, t], [np.sin(p), np.cos(p), np.sin(p / 100),
                                          np.cos(p / 100)], atol=1e-6)
  far = positions.sinusoidal(jnp.array([[100_000]]), features=6)  # No table, no limit.
  assert np.isfinite(far).all() and np.abs(far).max() <= 1


def test_rope_equals_explicit_rotations_and_depends_on_distance_only():
  x = _normal(0, (1, 3, 2, 6))  # [B, L, N, H], H = 6: pairs (0,3), (1,4), (2,5).
  pos = jnp.array([[0, 1, 7]])
  rotated = np.asarray(positions.rotate_half(x, pos, base=10000.0))
  for t, p in enumerate([0, 1, 7]):
    for n in range(2):
      for i in range(3):
        theta = p * 10000.0 ** (-2 * i / 6)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        expected = rot @ np.asarray(x[0, t, n, [i, i + 3]])
        np.testing.assert_allclose(rotated[0, t, n, [i, i + 3]], expected, atol=1e-5)

  q, k = _normal(1, (1, 1, 1, 8)), _normal(2, (1, 1, 1, 8))

  def dot(m, n):
    return float(jnp.sum(positions.rotate_half(q, jnp.array([[m]]))
                         * positions.rotate_half(k, jnp.array([[n]]))))

  assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
  assert dot(7, 3) == pytest.approx(dot(4, 0), abs=1e-4)
  assert dot(7, 3) != pytest.approx(dot(7, 4), abs=1e-3)


def test_alibi_slopes_and_bias():
  np.testing.assert_allclose(relative.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
  # 6 heads: the 4-head slopes, then the 1st and 3rd of the 8-head ones.
  np.testing.assert_allclose(relative.alibi_slopes(6),
                             [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
  q = jnp.zeros((1, 4, 8, 2))
  pos = [[3, 4, 5, 6]]
  bias = np.asarray(positions.Alibi().bias(q, q, _context(pos), score='scaled_dot',
                                           dtype=jnp.float32, param_dtype=jnp.float32))
  for n in range(8):
    for i in range(4):
      for j in range(i + 1):
        assert bias[0, n, i, j] == pytest.approx(-(2.0 ** -(n + 1)) * (i - j))


@pytest.mark.parametrize('bidirectional, table', [
    # distance = query - key (how far back the key is) -> bucket; 8 buckets, max 16.
    (False, {0: 0, 1: 1, 3: 3, 4: 4, 7: 5, 9: 6, 15: 7, 16: 7, 1000: 7, -1: 0, -5: 0}),
    # Per direction 4 buckets (2 exact); keys after the query use buckets 4..7.
    (True, {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 8: 3, 1000: 3, -1: 5, -2: 6, -3: 6, -8: 7,
            -1000: 7}),
])
def test_t5_buckets_by_hand(bidirectional, table):
  distance = np.array(list(table))
  buckets = relative.t5_bucket(jnp.asarray(-distance), bidirectional=bidirectional,
                               num_buckets=8, max_distance=16)
  np.testing.assert_array_equal(buckets, list(table.values()))


def test_deberta_log_buckets_by_hand():
  # 16 rows: span 8, mid 4; row 8 + r for |r| <= 4, then ceil-log steps up to distance 64.
  table = {0: 8, 3: 11, -4: 4, 5: 13, 10: 14, -10: 2, 20: 15, 64: 15, -64: 0, 1000: 15}
  index = relative.log_bucket_index(jnp.array(list(table)), num_buckets=16, max_distance=64)
  np.testing.assert_array_equal(index, list(table.values()))


def test_t5_bias_reads_its_table_per_bucket_and_head():
  module = relative.T5Bias(num_heads=3, num_buckets=8, max_distance=16, bidirectional=True)
  context = _context([[0, 1, 2, 3, 9]], [[0, 1, 2, 3, 9]])
  variables = nn.unbox(module.init(jax.random.key(0), context))
  table = np.asarray(variables['params']['embedding'])
  bias = np.asarray(module.apply(variables, context))
  pos = [0, 1, 2, 3, 9]
  for i in range(5):
    for j in range(5):
      bucket = int(relative.t5_bucket(jnp.array(pos[j] - pos[i]), bidirectional=True,
                                      num_buckets=8, max_distance=16))
      np.testing.assert_allclose(bias[0, :, i, j], table[bucket])


def _mask(batch, length):
  mask = np.tril(np.ones((length, length), bool))[None, None].repeat(batch, 0)
  mask[1, 0, :, :2] = False  # Row 1: two padded keys; its first two queries see nothing.
  return jnp.asarray(mask)


def test_shaw_matches_a_loop_over_its_equation():
  batch, length, heads, head_dim, k = 2, 6, 2, 4, 2
  q, kk, v = (_normal(s, (batch, length, heads, head_dim)) for s in (1, 2, 3))
  pos = jnp.asarray([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
  context, mask = _context(pos), _mask(batch, length)
  module = relative.ShawAttention(window=k)
  call = functools.partial(module.apply, mask_B1TS=mask, score='scaled_dot', dropout=None)
  variables = nn.unbox(module.init(jax.random.key(0), q, kk, v, context, mask_B1TS=mask,
                                   score='scaled_dot', dropout=None))
  out = np.asarray(call(variables, q, kk, v, context))
  a_k = np.asarray(variables['params']['key_table'])
  a_v = np.asarray(variables['params']['value_table'])
  q, kk, v, mask, pos = map(np.asarray, (q, kk, v, mask, pos))
  for b in range(batch):
    for i in range(length):
      for n in range(heads):
        rel = [max(-k, min(k, pos[b, j] - pos[b, i])) + k for j in range(length)]
        e = np.array([q[b, i, n] @ (kk[b, j, n] + a_k[rel[j]]) / math.sqrt(head_dim)
                      for j in range(length)])
        alpha = _softmax_rows(e, mask[b, 0, i])
        z = sum(alpha[j] * (v[b, j, n] + a_v[rel[j]]) for j in range(length))
        np.testing.assert_allclose(out[b, i, n], z, atol=1e-5)


def test_deberta_matches_a_loop_over_its_equation():
  batch, length, heads, head_dim, features, rows = 2, 5, 2, 4, 6, 8
  q, kk, v = (_normal(s, (batch, length, heads, head_dim)) for s in (4, 5, 6))
  table = _normal(7, (rows, features))
  pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
  context, mask = _context(pos, shared=table), _mask(batch, length)
  scheme = positions.Deberta(relative_buckets=rows, relative_max_distance=8)

  def run(q, kk, v):
    attend = functools.partial(attention.attend, mask_B1TS=mask, score='scaled_dot')
    return scheme.attend(q, kk, v, context, attend=attend, mask_B1TS=mask, score='scaled_dot',
                         kernel='xla', dropout=None, dtype=jnp.float32,
                         param_dtype=jnp.float32)

  class Host(nn.Module):  # A parent, so the scheme's submodule has a scope.
    @nn.compact
    def __call__(self, q, kk, v):
      return run(q, kk, v)

  variables = nn.unbox(Host().init(jax.random.key(0), q, kk, v))
  out = np.asarray(Host().apply(variables, q, kk, v))
  params = variables['params']['relative']
  key_r = np.einsum('rd,dnh->rnh', table, params['position_key']['kernel'])
  query_r = np.einsum('rd,dnh->rnh', table, params['position_query']['kernel'])

  def delta(i_pos, j_pos):
    return int(relative.log_bucket_index(jnp.array(i_pos - j_pos), num_buckets=rows,
                                         max_distance=8))

  q, kk, v, mask, pos = map(np.asarray, (q, kk, v, mask, pos))
  for b in range(batch):
    for i in range(length):
      for n in range(heads):
        logits = np.array([
            (q[b, i, n] @ kk[b, j, n]
             + q[b, i, n] @ key_r[delta(pos[b, i], pos[b, j]), n]
             + kk[b, j, n] @ query_r[delta(pos[b, j], pos[b, i]), n]) / math.sqrt(3 * head_dim)
            for j in range(length)])
        alpha = _softmax_rows(logits, mask[b, 0, i])
        np.testing.assert_allclose(out[b, i, n], alpha @ v[b, :, n], atol=1e-5)


def test_make_takes_its_settings_and_rejects_bad_ones():
  assert positions.make('shaw', dict(relative_window=3, rope_base=5.0)) == positions.Shaw(3)
  assert positions.make('rope', dict(rope_base=500.0)).rope_base == 500.0
  with pytest.raises(ValueError, match='unknown position'):
    positions.make('spiral')
  with pytest.raises(ValueError, match='relative_window'):
    positions.Shaw(relative_window=0)


# ----------------------------------------------------------------------- GPT, per scheme


@functools.cache
def _model(position, **changes):
  config = gpt.GPTConfig(**{**TINY, 'position': position, **changes})
  model = gpt.GPT(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl='rbg'), tokens))['params']
  # Larger random weights than the initializer's, so positions visibly matter.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  leaves = [jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype) for x in leaves]
  return model, jax.tree.unflatten(treedef, leaves), jax.jit(model.apply)


def _tokens(seed, length, batch=1):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 32, (batch, length)), jnp.int32)


@pytest.mark.parametrize('position', SCHEMES)
def test_gpt_shapes_and_finite_beyond_max_len_unless_learned(position):
  model, params, apply = _model(position)
  logits = apply({'params': params}, _tokens(0, 8, batch=2))
  assert logits.shape == (2, 8, 32) and np.isfinite(logits).all()
  if position != 'learned':  # No table: any position works, max_len bounds nothing.
    long = apply({'params': params}, _tokens(1, 24))
    assert np.isfinite(long).all()


def test_parameters_live_where_each_scheme_shares_them():
  top = {name: set(_model(name)[1]) for name in ('t5', 'deberta', 'shaw', 'rope', 'learned')}
  assert 'relative_bias' in top['t5']  # Once per model: shared by the layers, as in T5.
  assert 'relative_embed' in top['deberta']
  assert 'position_embed' in top['learned'] and 'position_embed' not in top['rope']
  shaw_layer = _model('shaw')[1]['block_1']['attention']['relative']
  assert shaw_layer['key_table'].shape == (2 * TINY['relative_window'] + 1, 8)
  assert set(_model('deberta')[1]['block_0']['attention']['relative']) == {
      'position_key', 'position_query'}


@pytest.mark.parametrize('position', SCHEMES)
def test_gpt_causal_by_gradient(position):
  model, params, _ = _model(position)
  length = 6
  tokens = _tokens(2, length)
  weights = _normal(3, (length, 32))

  def outputs(x_TD):
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.Embed) and context.method_name == '__call__':
        return x_TD[None]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits = model.apply({'params': params}, tokens)
    return jnp.sum(logits[0] * weights, axis=-1)

  influence = np.abs(np.asarray(jax.jit(jax.jacrev(outputs))(_normal(4, (length, 16))))).sum(-1)
  future = np.triu(np.ones((length, length), bool), k=1)
  assert (influence[future] == 0).all()
  assert (influence[~future] > 0).all()


@pytest.mark.parametrize('position', SCHEMES)
def test_gpt_packed_document_equals_alone(position):
  """Every scheme reads position ids, which restart per document.

  Within a document, differences of slots equal differences of position ids, so only the
  absolute schemes would notice slots; relative ones read ids too, so that they agree
  with the cache, whose left-padded rows have the same slots but other positions.
  """
  _, params, apply = _model(position)
  doc_a, doc_b = _tokens(5, 5)[0], _tokens(6, 6)[0]
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros(2, jnp.int32)])[None]
  segments = jnp.array([[1] * 5 + [2] * 6 + [0] * 2])
  pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 0]])
  logits = apply({'params': params}, packed, segment_ids_BT=segments, positions_BT=pos)
  alone_b = apply({'params': params}, doc_b[None])
  np.testing.assert_allclose(logits[0, 5:11], alone_b[0], atol=1e-4, rtol=1e-4)
  assert np.isfinite(logits).all()
  if position in ('learned', 'sinusoidal'):  # Slots as positions would differ here.
    shifted = apply({'params': params}, packed, segment_ids_BT=segments)
    assert not np.allclose(shifted[0, 5:11], alone_b[0], atol=1e-3)


@functools.cache
def _decoder(position):
  model, params, _ = _model(position)
  init = jax.jit(functools.partial(model.init, decode=True))
  step = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
  return init, step


@pytest.mark.parametrize('position', SCHEMES)
def test_gpt_cache_decoding_equals_full_forward(position):
  model, params, apply = _model(position)
  tokens = _tokens(7, 7, batch=2)
  full = apply({'params': params}, tokens)
  init, step = _decoder(position)
  cache = init(jax.random.key(0, impl='rbg'), jnp.zeros((2, TINY['max_len']), jnp.int32))
  logits, state = step({'params': params, 'cache': cache['cache']}, tokens[:, :4])
  chunks = [logits]
  for t in range(4, 7):
    logits, state = step({'params': params, 'cache': state['cache']}, tokens[:, t:t + 1])
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('position', SCHEMES)
def test_gpt_left_padded_batch_decoding_equals_each_row_alone(position):
  """Rows of different prompt lengths: per-row positions in a shared cache."""
  model, params, apply = _model(position)
  seq_a, seq_b = _tokens(8, 7)[0], _tokens(9, 5)[0]
  # Prompts of 5 and 3 tokens, left-padded to 5; then two decode steps each.
  prompt = jnp.stack([seq_a[:5], jnp.concatenate([jnp.zeros(2, jnp.int32), seq_b[:3]])])
  segments = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
  pos = jnp.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
  init, step = _decoder(position)
  cache = init(jax.random.key(0, impl='rbg'), jnp.zeros((2, TINY['max_len']), jnp.int32))
  logits, state = step({'params': params, 'cache': cache['cache']}, prompt,
                       segment_ids_BT=segments, positions_BT=pos)
  rows_a, rows_b = [logits[0]], [logits[1, 2:]]
  for t in range(2):
    new = jnp.stack([seq_a[5 + t:6 + t], seq_b[3 + t:4 + t]])
    logits, state = step({'params': params, 'cache': state['cache']}, new,
                         segment_ids_BT=jnp.ones((2, 1), jnp.int32),
                         positions_BT=jnp.array([[5 + t], [3 + t]]))
    rows_a.append(logits[0])
    rows_b.append(logits[1])
  alone_a = apply({'params': params}, seq_a[None])[0]
  alone_b = apply({'params': params}, seq_b[None])[0]
  np.testing.assert_allclose(jnp.concatenate(rows_a), alone_a, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(jnp.concatenate(rows_b), alone_b, atol=1e-4, rtol=1e-4)


def test_shaw_refuses_a_fused_kernel():
  model = gpt.GPT(gpt.GPTConfig(**{**TINY, 'position': 'shaw', 'kernel': 'cudnn'}))
  with pytest.raises(ValueError, match="kernel='xla'"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize('change, field', [
    (dict(position='spiral'), 'position'),
    (dict(relative_window=0), 'relative_window'),
    (dict(relative_window=2.5), 'relative_window'),
    (dict(relative_buckets=3), 'relative_buckets'),
    (dict(relative_max_distance=-1), 'relative_max_distance'),
    (dict(rope_base=0.0), 'rope_base'),
])
def test_config_validation_names_the_field(change, field):
  with pytest.raises(ValueError, match=f'GPTConfig.{field}'):
    gpt.GPTConfig(**{**TINY, **change})


def test_sinusoidal_scheme_adds_sinusoids_at_the_embeddings_scale():
  scheme = positions.make('sinusoidal', {'sinusoid_scale': 0.02})
  positions_BT = jnp.arange(6)[None]
  x_BTD = scheme.embed(positions_BT, max_len=4, features=8, dtype=jnp.float32,
                       param_dtype=jnp.float32)
  np.testing.assert_allclose(x_BTD, 0.02 * positions.sinusoidal(positions_BT, 8), rtol=1e-6)
  with pytest.raises(ValueError, match='sinusoid_scale must be a positive'):
    positions.make('sinusoidal', {'sinusoid_scale': 0.0})
