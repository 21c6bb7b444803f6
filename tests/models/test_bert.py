"""BERT/RoBERTa on the shared Encoder stack: shapes, masks, presets, scan == unrolled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import bert

TINY = dict(vocab_size=50, max_len=16, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32)


def _close(a, b, rel=1e-5):
  """Equal up to float32 reduction order, relative to the larger tensor's scale."""
  scale = max(float(np.abs(np.asarray(b)).max()), 1e-30)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rel, atol=rel * scale)


@pytest.fixture(scope='module')
def tiny():
  model = bert.BERT(bert.BertConfig(**TINY))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 5, 50)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))['params']
  return model, params, tokens


def test_outputs_shapes_finite_and_same_with_jit(tiny):
  model, params, tokens = tiny
  out = model.apply({'params': params}, tokens, hidden_states=True)
  assert out['hidden'].shape == (2, 8, 16) and out['pooled'].shape == (2, 16)
  assert out['mlm_logits'].shape == (2, 8, 50) and out['mlm_logits'].dtype == jnp.float32
  assert out['nsp_logits'].shape == (2, 2) and out['nsp_logits'].dtype == jnp.float32
  assert len(out['hidden_states']) == TINY['num_layers'] + 1
  np.testing.assert_array_equal(out['hidden_states'][-1], out['hidden'])
  for value in jax.tree.leaves(out):
    assert np.all(np.isfinite(value))
  jitted = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, tokens)
  _close(jitted['mlm_logits'], out['mlm_logits'])


def test_every_token_sees_both_directions_by_gradient(tiny):
  """The first token's output depends on the last token's embedding (not causal)."""
  model, params, tokens = tiny

  def first_output(embedding):
    p = {**params, 'token_embed': {'embedding': embedding}}
    return model.apply({'params': p}, tokens)['hidden'][0, 0].sum()

  grad_VD = jax.grad(first_output)(params['token_embed']['embedding'])
  assert np.abs(grad_VD[tokens[0, -1]]).max() > 0


def test_padding_and_packed_segments_are_invisible(tiny):
  """A row's real tokens give the same outputs whatever the padding or the other segment."""
  model, params, tokens = tiny
  alone = model.apply({'params': params}, tokens[:, :5])['hidden']
  segments = jnp.array([[1] * 5 + [0] * 3, [1] * 5 + [2] * 3])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
  # Padding holds arbitrary ids (RoBERTa pads with 1): only segment ids mark it.
  padded_tokens = tokens.at[0, 5:].set(1)
  padded = model.apply({'params': params}, padded_tokens, segment_ids_BT=segments,
                       positions_BT=positions)['hidden']
  _close(padded[:, :5], alone)
  second = model.apply({'params': params}, tokens[1:, 5:])['hidden']
  _close(padded[1:, 5:], second)


def test_token_types_change_the_output(tiny):
  model, params, tokens = tiny
  a = model.apply({'params': params}, tokens)['hidden']
  b = model.apply({'params': params}, tokens, token_types_BT=jnp.ones_like(tokens))['hidden']
  assert np.abs(a - b).max() > 1e-3


def test_roberta_preset_offsets_positions_and_drops_nsp():
  config = bert.BertConfig(**{**TINY, **bert.roberta_preset(max_len=18)})
  model = bert.BERT(config)
  tokens = jnp.arange(2 * 8, dtype=jnp.int32).reshape(2, 8) % 50
  params = nn.unbox(model.init(jax.random.key(0), tokens))['params']
  assert params['type_embed']['embedding'].shape == (1, 16)
  out = model.apply({'params': params}, tokens)
  assert 'nsp_logits' not in out
  # Pair tasks mark sentence B with type 1; with one type it reads as type 0.
  typed = model.apply({'params': params}, tokens, token_types_BT=jnp.ones_like(tokens))
  np.testing.assert_array_equal(typed['hidden'], out['hidden'])
  # Position id p reads row p + 2 of the table: shifting the table by two rows and the
  # offset by -2 gives the same model.
  shifted = bert.BERT(bert.BertConfig(**{**TINY, **bert.roberta_preset(max_len=18,
                                                                      position_offset=0)}))
  table = params['position_embed']['embedding']
  moved = {**params, 'position_embed': {'embedding': jnp.roll(table, -2, axis=0)}}
  _close(shifted.apply({'params': moved}, tokens)['hidden'], out['hidden'])


def test_scan_and_remat_equal_the_unrolled_layers(tiny):
  model, params, tokens = tiny
  expected = model.apply({'params': params}, tokens, hidden_states=True)
  scanned = bert.BERT(bert.BertConfig(**TINY, scan_layers=True, remat='full'))
  layers = [params['encoder'][f'block_{i}'] for i in range(TINY['num_layers'])]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  scan_params = {**params, 'encoder': {'blocks': stacked}}
  out = scanned.apply({'params': scan_params}, tokens, hidden_states=True)
  _close(out['mlm_logits'], expected['mlm_logits'])
  for a, b in zip(out['hidden_states'], expected['hidden_states'], strict=True):
    _close(a, b)


@pytest.mark.parametrize('change, message', [
    (dict(mask='causal'), 'BertConfig.mask'),
    (dict(type_vocab_size=0), 'BertConfig.type_vocab_size'),
    (dict(position_offset=16), 'BertConfig.position_offset'),
    (dict(norm_position='middle'), 'BertConfig.norm_position'),
    (dict(activation='gelu9'), 'BertConfig.activation'),
    (dict(norm='batch'), 'BertConfig.norm'),
])
def test_config_validation_names_the_field(change, message):
  with pytest.raises(ValueError, match=message):
    bert.BertConfig(**{**TINY, **change})


def test_registered_by_name():
  assert models.get('bert') == (bert.BertConfig, bert.BERT)
