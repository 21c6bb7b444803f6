"""DeBERTa on the shared Encoder stack: shapes, jit, scan == unrolled, padding and packing,
config errors, DeBERTa-v2's buckets by hand and the enhanced mask decoder (EMD).

Parity with transformers lives in tests/hf/test_deberta_parity.py.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from hf import deberta as hf_deberta
from models import deberta
from models import relative
from tests import tolerances

# 8 relative rows (4 buckets a side, exact up to 2) ending at distance 6, so rows of 8
# tokens reach the log and the clipped buckets.
TINY = dict(vocab_size=40, max_len=16, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32,
            relative_buckets=8, relative_max_distance=6)
VARIANTS = {
    'v3': {},  # no token types, no absolute positions at the input
    'biased_input': dict(position_biased_input=True, type_vocab_size=2, pos_att_type='p2c',
                         norm_rel_ebd='none'),
    'emd': dict(emd_layers=2),
}


def _random_params(cfg: deberta.DebertaConfig, seed: int = 0) -> dict:
  """Unrolled parameters, every leaf redrawn N(0, 0.3) (+1 for norm scales) so that no bias
  is 0 and positions visibly matter."""
  model = deberta.DeBERTa(dataclasses.replace(cfg, scan_layers=False))
  tree = flax.core.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.normal(0, 0.3, x.shape)
                                  + (path[-1].key == 'scale'), jnp.float32),
      tree['params'])


def _tokens(seed=1, shape=(2, 8)):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 40, shape), jnp.int32)


def _apply(cfg, params, tokens, **kwargs):
  return deberta.DeBERTa(cfg).apply({'params': params}, tokens, **kwargs)


@pytest.mark.parametrize('variant', VARIANTS)
def test_outputs_shapes_finite_and_same_with_jit(variant):
  cfg = deberta.DebertaConfig(**TINY, **VARIANTS[variant])
  params, tokens = _random_params(cfg), _tokens()
  out = _apply(cfg, params, tokens, hidden_states=True)
  assert set(out) == {'hidden', 'mlm_logits', 'hidden_states'}
  assert out['hidden'].shape == (2, 8, 16)
  assert out['mlm_logits'].shape == (2, 8, 40) and out['mlm_logits'].dtype == jnp.float32
  assert len(out['hidden_states']) == cfg.num_layers + 1
  np.testing.assert_array_equal(out['hidden_states'][-1], out['hidden'])
  for value in jax.tree.leaves(out):
    assert np.all(np.isfinite(value))
  jitted = jax.jit(lambda p, x: _apply(cfg, p, x, hidden_states=True))(params, tokens)
  tolerances.assert_trees_close(jitted, out)
  # Dropout runs (and differs from the deterministic pass) where a dropout rng is given.
  noisy = _apply(dataclasses.replace(cfg, dropout_rate=0.3), params, tokens,
                 deterministic=False, rngs={'dropout': jax.random.key(3)})
  assert np.all(np.isfinite(noisy['mlm_logits']))
  assert not np.allclose(noisy['mlm_logits'], out['mlm_logits'])


def test_registered_and_parameters_where_deberta_v2_keeps_them():
  assert models.get('deberta') == (deberta.DebertaConfig, deberta.DeBERTa)
  params = _random_params(deberta.DebertaConfig(**TINY))
  # One relative table (with its LayerNorm) for the stack; the layers project it with
  # their own query/key projections, so they hold no position projections of their own.
  assert set(params['encoder']['relative_embed']) == {'embedding', 'norm'}
  assert set(params['encoder']['block_0']['attention']) == {'query', 'key', 'value', 'out'}
  assert 'position_embed' not in params and 'type_embed' not in params
  biased = _random_params(deberta.DebertaConfig(**TINY, **VARIANTS['biased_input']))
  assert biased['position_embed']['embedding'].shape == (16, 16)
  assert biased['type_embed']['embedding'].shape == (2, 16)
  assert set(biased['encoder']['relative_embed']) == {'embedding'}


@pytest.mark.parametrize('variant', VARIANTS)
def test_scan_layers_equals_unrolled(variant):
  cfg = deberta.DebertaConfig(**TINY, **VARIANTS[variant])
  params, tokens = _random_params(cfg, seed=2), _tokens(seed=3)
  segments = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  unrolled = _apply(cfg, params, tokens, segment_ids_BT=segments, hidden_states=True)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  stacked = hf_deberta.stack_layers(params, cfg.num_layers)
  scanned = _apply(scanned_cfg, stacked, tokens, segment_ids_BT=segments, hidden_states=True)
  tolerances.assert_trees_close(scanned, unrolled)
  # The stacked tree is what a scanned init makes.
  init = jax.eval_shape(deberta.DeBERTa(scanned_cfg).init, jax.random.key(0), tokens)
  shapes = jax.tree.map(lambda x: x.shape, flax.core.meta.unbox(init)['params'])
  assert shapes == jax.tree.map(lambda x: x.shape, stacked)


@pytest.mark.parametrize('variant', VARIANTS)
def test_padding_and_packed_segments_do_not_leak(variant):
  """Real tokens' outputs do not depend on padding tokens or on the other packed segment."""
  cfg = deberta.DebertaConfig(**TINY, **VARIANTS[variant])
  params, tokens = _random_params(cfg, seed=4), _tokens(seed=5)
  types = jnp.array([[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 1]])
  segments = jnp.array([[1] * 5 + [0] * 3, [1] * 5 + [2] * 3])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
  run = lambda t, **kw: _apply(cfg, params, t, token_types_BT=types, **kw)
  packed = run(tokens, segment_ids_BT=segments, positions_BT=positions)
  changed = tokens.at[0, 5:].set(7).at[1, 5:].set(9)  # padding, and the second segment
  other = run(changed, segment_ids_BT=segments, positions_BT=positions)
  for key in ('hidden', 'mlm_logits'):
    tolerances.assert_close(other[key][:, :5], packed[key][:, :5])
    assert not np.allclose(other[key][1, 5:], packed[key][1, 5:])  # the change is seen there
  # Each packed segment computes what it computes alone, positions restarting at 0.
  alone = _apply(cfg, params, tokens[:, :5], token_types_BT=types[:, :5])
  second = _apply(cfg, params, tokens[1:, 5:], token_types_BT=types[1:, 5:])
  for key in ('hidden', 'mlm_logits'):
    tolerances.assert_close(packed[key][:, :5], alone[key])
    tolerances.assert_close(packed[key][1:, 5:], second[key])


@pytest.mark.parametrize('field, value', [
    ('vocab_size', 0), ('max_len', -1), ('type_vocab_size', -1), ('emd_layers', -2),
    ('position_biased_input', 'yes'), ('pos_att_type', 'c2p|p2p'), ('pos_att_type', ''),
    ('pos_att_type', 'c2p|c2p'), ('norm_rel_ebd', 'rms'), ('relative_buckets', 7),
    ('relative_max_distance', 3), ('share_att_key', 1), ('position', 'learned'),
    ('num_heads', 3), ('mask', 'causal')])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=rf'DebertaConfig\.{field}'):
    deberta.DebertaConfig(**{**TINY, field: value})


def test_emd_config_errors_name_the_fields():
  with pytest.raises(ValueError, match=r'DebertaConfig\.emd_layers=2 .*position_biased_input'):
    deberta.DebertaConfig(**TINY, emd_layers=2, position_biased_input=True)
  with pytest.raises(ValueError, match=r'DebertaConfig\.emd_layers=1 .*norm_position'):
    deberta.DebertaConfig(**TINY, emd_layers=1, norm_position='pre')


def test_deberta_v2_buckets_by_hand():
  # 16 rows: position_buckets 8, mid 4; max_relative_positions 20, so beyond mid
  # d -> 4 + ceil(log(d/4) / log(19/4) * 3) with 19 -> exactly 7; clipped to [-8, 8).
  def by_hand(d):
    if abs(d) <= 4:
      return d + 8
    far = 4 + math.ceil(math.log(abs(d) / 4) / math.log(19 / 4) * 3 - 1e-9)
    return min(max(int(math.copysign(far, d)), -8), 7) + 8
  distances = [0, 1, -4, 4, 5, -5, 8, 12, 19, -19, 20, -20, 500, -500]
  expected = [by_hand(d) for d in distances]
  assert expected[:9] == [8, 9, 4, 12, 13, 3, 14, 15, 15] and expected[9:] == [1, 15, 0, 15, 0]
  index = jax.jit(lambda r: relative.deberta_v2_bucket_index(
      r, num_buckets=16, max_distance=20))(jnp.asarray(distances))
  np.testing.assert_array_equal(index, expected)


# ---------------------------------------------------------------------------------- EMD


def test_emd_has_no_weights_but_the_position_table():
  plain = _random_params(deberta.DebertaConfig(**TINY))
  emd = _random_params(deberta.DebertaConfig(**TINY, emd_layers=2))
  assert set(emd) - set(plain) == {'position_embed'}
  assert (jax.tree.map(np.shape, {k: v for k, v in emd.items() if k != 'position_embed'})
          == jax.tree.map(np.shape, plain))


def test_emd_reruns_the_last_layer_with_positions_on_the_queries():
  """One EMD step with a zero position table is the last layer again on its own input
  (queries = keys = h_{L-1}): the logits of the model without EMD. Positions change them,
  the hidden output never, and the gradient reaches the table and the last layer."""
  cfg = deberta.DebertaConfig(**TINY, emd_layers=1)
  params, tokens = _random_params(cfg, seed=6), _tokens(seed=7)
  segments = jnp.array([[1] * 8, [1] * 6 + [0] * 2])
  plain_cfg = dataclasses.replace(cfg, emd_layers=0)
  plain_params = {k: v for k, v in params.items() if k != 'position_embed'}
  plain = _apply(plain_cfg, plain_params, tokens, segment_ids_BT=segments)
  zero_table = {**params, 'position_embed': {'embedding': jnp.zeros((16, 16))}}
  zero = _apply(cfg, zero_table, tokens, segment_ids_BT=segments)
  tolerances.assert_close(zero['mlm_logits'], plain['mlm_logits'])
  with_positions = _apply(cfg, params, tokens, segment_ids_BT=segments)
  np.testing.assert_array_equal(with_positions['hidden'], plain['hidden'])
  assert not np.allclose(with_positions['mlm_logits'], plain['mlm_logits'], atol=1e-3)
  # Two steps differ from one: the second step's queries are the first step's output.
  two = _apply(dataclasses.replace(cfg, emd_layers=2), params, tokens, segment_ids_BT=segments)
  assert not np.allclose(two['mlm_logits'], with_positions['mlm_logits'], atol=1e-3)

  # With the zero table the two models are one function of the shared weights, so their
  # gradients agree: the EMD's path through the encoder's last layer is differentiated.
  def grads(c, p):
    return jax.grad(lambda p: jnp.sum(
        _apply(c, p, tokens, segment_ids_BT=segments)['mlm_logits'][:, :, 0]))(p)
  emd_grads = grads(cfg, zero_table)
  tolerances.assert_trees_close({k: v for k, v in emd_grads.items() if k != 'position_embed'},
                                grads(plain_cfg, plain_params))
  table_grads = grads(cfg, params)['position_embed']['embedding']
  assert np.abs(table_grads[:8]).max() > 0 and np.abs(table_grads[8:]).max() == 0
