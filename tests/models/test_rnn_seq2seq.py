"""Tests of models/rnn_seq2seq.py: shapes and jit, step-by-step decoding against teacher
forcing, packed rows, what each decoder era reads, and the config's errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import rnn_seq2seq
from tests.tolerances import assert_close

# Each decoder era with each cell and each encoder direction, input feeding on and off,
# stacked and single layers, tied and untied outputs: a covering set, not the product,
# to keep the file's compilations within a minute.
KINDS = {
    'none-lstm-uni': dict(attention='none', cell='lstm'),
    'none-gru-bi-2layers': dict(attention='none', cell='gru', bidirectional=True,
                                num_layers=2),
    'bahdanau-gru-bi': dict(attention='bahdanau', cell='gru', bidirectional=True),
    'bahdanau-lstm-uni-2layers-shared': dict(attention='bahdanau', cell='lstm', num_layers=2,
                                             share_embeddings=True),
    'luong-dot-feed-lstm-bi': dict(luong_score='dot', input_feeding=True, bidirectional=True),
    'luong-general-gru-uni-shared': dict(luong_score='general', cell='gru',
                                         share_embeddings=True),
    'luong-concat-feed-gru-uni-2layers': dict(luong_score='concat', cell='gru',
                                              input_feeding=True, num_layers=2),
}
# Also compared without jit (eager is slow; single layers): both cells, both directions,
# every era.
UNJITTED = ('none-lstm-uni', 'bahdanau-gru-bi', 'luong-dot-feed-lstm-bi',
            'luong-general-gru-uni-shared')
TINY = dict(vocab_size=13, max_len=8, embed_dim=8, hidden_dim=8)
BATCH, SOURCE_LEN, TARGET_LEN = 2, 7, 6


def _config(kind: str, **changes) -> rnn_seq2seq.RNNSeq2SeqConfig:
  return rnn_seq2seq.RNNSeq2SeqConfig(**{**TINY, 'attention': 'luong', **KINDS[kind],
                                         **changes})


def _tokens(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(1, TINY['vocab_size'], shape),
                     jnp.int32)


@functools.cache
def _model(kind: str):
  """(model, params). The parameters are drawn from U(-1, 1) over the shapes that
  `init` gives: no compilation, and weights large enough for every dependence to show."""
  model = rnn_seq2seq.RNNSeq2Seq(_config(kind))
  shapes = jax.eval_shape(model.init, jax.random.key(0), _tokens(0, (BATCH, SOURCE_LEN)),
                          _tokens(1, (BATCH, TARGET_LEN)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape), s.dtype),
                        nn.unbox(shapes)['params'])
  return model, params


def _forward_fn(model):
  """params, batch -> (logits, attention weights [B, T, S] or None, encoded): `__call__`
  as `encode` then `decode` (compared with `__call__` itself without jit)."""
  def forward(params, batch):
    encoded = model.apply({'params': params}, batch['inputs_BS'],
                          segment_ids_BS=batch['inputs_segment_ids_BS'],
                          positions_BS=batch['inputs_positions_BS'], method='encode')
    logits, state = model.apply(
        {'params': params}, batch['decoder_inputs_BT'], encoded,
        segment_ids_BT=batch['targets_segment_ids_BT'],
        positions_BT=batch['targets_positions_BT'], method='decode', mutable='intermediates')
    weights = state.get('intermediates', {}).get('attention_weights', (None,))[0]
    return logits, weights, encoded
  return forward


@functools.cache
def _forward(kind: str):
  """One jitted forward per kind, shared by the tests."""
  model, _ = _model(kind)
  return jax.jit(_forward_fn(model))


def _batch(targets=None):
  """Row 0 fills the source; row 1 ends in two padding slots. One target per row."""
  source = _tokens(2, (BATCH, SOURCE_LEN))
  segments = jnp.array([[1] * SOURCE_LEN, [1] * (SOURCE_LEN - 2) + [0, 0]], jnp.int32)
  return dict(inputs_BS=source * segments,
              decoder_inputs_BT=_tokens(3, (BATCH, TARGET_LEN)) if targets is None else targets,
              inputs_segment_ids_BS=segments,
              inputs_positions_BS=jnp.where(segments > 0, jnp.arange(SOURCE_LEN), 0),
              targets_segment_ids_BT=jnp.ones((BATCH, TARGET_LEN), jnp.int32),
              targets_positions_BT=jnp.broadcast_to(jnp.arange(TARGET_LEN),
                                                    (BATCH, TARGET_LEN)))


@pytest.mark.parametrize('kind', KINDS)
def test_shapes_finite_and_same_with_jit(kind):
  model, params = _model(kind)
  cfg = model.config
  logits, weights, encoded = _forward(kind)(params, _batch())
  assert logits.shape == (BATCH, TARGET_LEN, TINY['vocab_size'])
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  if kind in UNJITTED:
    assert_close(model.apply({'params': params}, **_batch()), logits)
  width = 2 * cfg.hidden_dim if cfg.bidirectional else cfg.hidden_dim
  assert encoded['hidden'].shape == (BATCH, SOURCE_LEN, width)
  assert not encoded['hidden'][1, -2:].any()  # padding annotates nothing
  np.testing.assert_array_equal(encoded['segment_ids'], _batch()['inputs_segment_ids_BS'])
  assert len(encoded['final']) == cfg.num_layers
  assert all(leaf.shape == (BATCH, SOURCE_LEN, width)
             for leaf in jax.tree.leaves(encoded['final']))
  if cfg.attention == 'none':
    assert weights is None
  else:
    assert weights.shape == (BATCH, TARGET_LEN, SOURCE_LEN)
    assert not weights[1, :, -2:].any()  # nor is it attended to


def _empty_cache(model, encoded):
  """The cache as a decoding library makes it: shapes from `init`, then zeros."""
  dummy = jnp.zeros((BATCH, model.config.max_len), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, method='decode', decode=True),
                          jax.random.key(0), dummy, encoded)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


@functools.cache
def _decode_all(kind: str):
  """One jitted step-by-step decoder per kind: (params, empty cache, encoded, tokens) ->
  (logits of each step, the final cache). The prime passes `encoded`, every later step
  None, as a decoding library does."""
  model, _ = _model(kind)

  @jax.jit
  def decode_all(params, cache, encoded, tokens_BT):
    step = functools.partial(model.apply, method='decode', decode=True, mutable='cache')
    first, mutated = step({'params': params, 'cache': cache}, tokens_BT[:, :1], encoded)

    def next_step(cache, token_B):
      logits, mutated = step({'params': params, 'cache': cache}, token_B[:, None], None)
      return mutated['cache'], logits[:, 0]

    cache, rest_TBV = jax.lax.scan(next_step, mutated['cache'], tokens_BT[:, 1:].T)
    return jnp.concatenate([first, jnp.swapaxes(rest_TBV, 0, 1)], axis=1), cache

  return decode_all


@pytest.mark.parametrize('kind', KINDS)
def test_step_by_step_decoding_equals_teacher_forcing(kind):
  model, params = _model(kind)
  batch = _batch()
  forced, _, encoded = _forward(kind)(params, batch)
  cache = _empty_cache(model, encoded)
  for leaf in jax.tree.leaves(cache):
    assert leaf.ndim == 0 or leaf.shape[0] == BATCH
  stepped, cache = _decode_all(kind)(params, cache, encoded, batch['decoder_inputs_BT'])
  assert_close(stepped, forced)
  assert int(cache['decoder']['index']) == TARGET_LEN


def _decode_with(kind: str, **changes):
  """Step-by-step logits and final cache from `encoded` with some entries changed."""
  model, params = _model(kind)
  batch = _batch()
  _, _, encoded = _forward(kind)(params, batch)
  encoded = {**encoded, **changes}
  return _decode_all(kind)(params, _empty_cache(model, encoded), encoded,
                           batch['decoder_inputs_BT'])


def _noise_like(x, seed=9):
  return jax.random.normal(jax.random.key(seed), x.shape, x.dtype)


@pytest.mark.parametrize('kind', ['none-lstm-uni', 'none-gru-bi-2layers', 'bahdanau-gru-bi',
                                  'luong-general-gru-uni-shared'])
def test_without_attention_the_source_enters_only_through_the_final_state(kind):
  model, params = _model(kind)
  _, _, encoded = _forward(kind)(params, _batch())
  reference, _ = _decode_with(kind)
  # Other annotations: the same logits without attention, others with it.
  other_annotations, _ = _decode_with(kind, hidden=_noise_like(encoded['hidden']))
  if model.config.attention == 'none':
    assert_close(other_annotations, reference)
  else:
    assert np.abs(other_annotations - reference).max() > 1e-3
  # Other final states: other logits in every era.
  other_finals, _ = _decode_with(kind, final=jax.tree.map(_noise_like, encoded['final']))
  assert np.abs(other_finals - reference).max() > 1e-3


def test_bahdanau_starts_from_the_backward_state_at_the_first_token():
  kind = 'bahdanau-gru-bi'  # A GRU's final state per layer is h = [h→; h←].
  model, params = _model(kind)
  _, _, encoded = _forward(kind)(params, _batch())
  hidden_dim = model.config.hidden_dim
  (final,) = encoded['final']
  reference, _ = _decode_with(kind)
  # s_0 = tanh(W_s h←_1): the forward half is not read, the backward half is.
  forward_changed, _ = _decode_with(
      kind, final=(final.at[..., :hidden_dim].set(_noise_like(final[..., :hidden_dim])),))
  assert_close(forward_changed, reference)
  backward_changed, _ = _decode_with(
      kind, final=(final.at[..., hidden_dim:].set(_noise_like(final[..., hidden_dim:])),))
  assert np.abs(backward_changed - reference).max() > 1e-3


@pytest.mark.parametrize('kind', ['luong-dot-feed-lstm-bi', 'luong-general-gru-uni-shared'])
def test_input_feeding_feeds_the_attentional_vector_to_the_next_step(kind):
  model, params = _model(kind)
  _, _, encoded = _forward(kind)(params, _batch())
  _, cache = _decode_with(kind)
  _, other_cache = _decode_with(kind, hidden=_noise_like(encoded['hidden']))
  # h_t = RNN(h_{t-1}, [y_{t-1}; h̃_{t-1}]) reads the annotations (through h̃_{t-1}) only
  # with input feeding; without it the decoder's states never see them.
  difference = max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(cache['decoder']['carry']),
      jax.tree.leaves(other_cache['decoder']['carry'])))
  if model.config.input_feeding:
    assert difference > 1e-3
  else:
    assert difference == 0


def test_a_padding_step_leaves_the_decoder_state_alone():
  kind = 'luong-dot-feed-lstm-bi'
  model, params = _model(kind)
  batch = _batch()
  targets = batch['decoder_inputs_BT']
  _, _, encoded = _forward(kind)(params, batch)

  @jax.jit
  def step(cache, tokens_B1, segment_ids_B1, encoded):
    return model.apply({'params': params, 'cache': cache}, tokens_B1, encoded,
                       segment_ids_BT=segment_ids_B1, method='decode', decode=True,
                       mutable='cache')

  real, padding = jnp.ones((BATCH, 1), jnp.int32), jnp.zeros((BATCH, 1), jnp.int32)
  _, primed = step(_empty_cache(model, encoded), targets[:, :1], real, encoded)
  expected, _ = step(primed['cache'], targets[:, 1:2], real, None)
  padded, mutated = step(primed['cache'], targets[:, 3:4], padding, None)
  assert np.isfinite(padded).all()
  after_padding, _ = step(mutated['cache'], targets[:, 1:2], real, None)
  assert_close(after_padding, expected)


def _packed_and_alone():
  """Two examples packed in each row (both sides; a then b, and b then a), and each
  example alone in a row of its own, padded."""
  src_a, src_b = _tokens(4, (3,)), _tokens(5, (3,))
  tgt_a, tgt_b = _tokens(6, (2,)), _tokens(7, (3,))

  def row(parts, length):
    tokens = np.zeros(length, np.int32)
    segments, positions = np.zeros(length, np.int32), np.zeros(length, np.int32)
    offset = 0
    for segment, part in enumerate(parts, 1):
      tokens[offset:offset + len(part)] = part
      segments[offset:offset + len(part)] = segment
      positions[offset:offset + len(part)] = np.arange(len(part))
      offset += len(part)
    return tokens, segments, positions

  def batch(source_rows, target_rows):
    source = [row(parts, SOURCE_LEN) for parts in source_rows]
    target = [row(parts, TARGET_LEN) for parts in target_rows]
    stack = lambda rows, i: jnp.asarray(np.stack([r[i] for r in rows]))
    return dict(inputs_BS=stack(source, 0), decoder_inputs_BT=stack(target, 0),
                inputs_segment_ids_BS=stack(source, 1), inputs_positions_BS=stack(source, 2),
                targets_segment_ids_BT=stack(target, 1), targets_positions_BT=stack(target, 2))

  return (batch([[src_a, src_b], [src_b, src_a]], [[tgt_a, tgt_b], [tgt_b, tgt_a]]),
          batch([[src_a], [src_b]], [[tgt_a], [tgt_b]]))


@pytest.mark.parametrize('kind', KINDS)
def test_a_packed_row_gives_each_example_its_own_logits(kind):
  model, params = _model(kind)
  packed, alone = _packed_and_alone()
  logits, weights, encoded = _forward(kind)(params, packed)
  expected, _, expected_encoded = _forward(kind)(params, alone)
  assert np.isfinite(logits).all()
  # Row 0 holds a (2 target tokens) then b (3); row 1 holds b then a.
  assert_close(logits[0, :2], expected[0, :2])
  assert_close(logits[0, 2:5], expected[1, :3])
  assert_close(logits[1, :3], expected[1, :3])
  assert_close(logits[1, 3:5], expected[0, :2])
  # The encoder restarts per segment, in both directions.
  hidden, expected_hidden = encoded['hidden'], expected_encoded['hidden']
  assert_close(hidden[0, :3], expected_hidden[0, :3])
  assert_close(hidden[0, 3:6], expected_hidden[1, :3])
  # Segment k's final state sits at slot k - 1.
  for packed_final, alone_final in zip(jax.tree.leaves(encoded['final']),
                                       jax.tree.leaves(expected_encoded['final'])):
    assert_close(packed_final[0, :2], alone_final[:, 0])
    assert_close(packed_final[1, :2], alone_final[::-1, 0])
  # The top layer's final h: forward at the segment's last token, backward at its first.
  cfg = model.config
  final_h = rnn_seq2seq.carry_hidden(cfg, encoded['final'][-1])
  hidden_dim = cfg.hidden_dim
  assert_close(final_h[0, :2, :hidden_dim], hidden[0, [2, 5], :hidden_dim])
  if cfg.bidirectional:
    assert_close(final_h[0, :2, hidden_dim:], hidden[0, [0, 3], hidden_dim:])
  if model.config.attention != 'none':
    assert np.isfinite(weights).all()
    assert not weights[0, :2, 3:].any() and not weights[0, 2:5, :3].any()  # own segment
    assert_close(weights[:, :5].sum(axis=-1), np.ones((BATCH, 5)))
    assert not weights[:, 5].any()  # a padding query sees nothing


@pytest.mark.parametrize('kind', ['bahdanau-gru-bi', 'bahdanau-lstm-uni-2layers-shared',
                                  'luong-dot-feed-lstm-bi', 'luong-general-gru-uni-shared'])
def test_bahdanau_queries_the_previous_state_luong_the_current_one(kind):
  model, params = _model(kind)
  targets = _batch()['decoder_inputs_BT']
  _, weights, _ = _forward(kind)(params, _batch(targets))
  changed_targets = targets.at[:, 0].set(targets[:, 0] % (TINY['vocab_size'] - 1) + 1)
  _, changed, _ = _forward(kind)(params, _batch(changed_targets))
  # s_1 reads y_0 in both eras, so the second query moves either way.
  assert np.abs(changed[:, 1] - weights[:, 1]).max() > 1e-5
  if model.config.attention == 'bahdanau':
    assert_close(changed[:, 0], weights[:, 0])  # s_0 does not read y_0
  else:
    assert np.abs(changed[:, 0] - weights[:, 0]).max() > 1e-5  # h_1 = RNN(y_0) does


@pytest.mark.parametrize('kind', ['bahdanau-gru-bi', 'bahdanau-lstm-uni-2layers-shared'])
def test_bahdanau_first_weights_follow_the_equation(kind):
  # a_1j = softmax_j(vᵀ tanh(W s_0 + U h_j)), s_0 = tanh(W_s h←_1 + b) of the top layer,
  # with U h_j projected once per source (the decoder's key projection).
  model, params = _model(kind)
  cfg = model.config
  batch = _batch()
  _, weights, encoded = _forward(kind)(params, batch)
  decoder = params['decoder']
  top = cfg.num_layers - 1
  final_BC = rnn_seq2seq.carry_hidden(cfg, encoded['final'][top])[:, 0]
  backward_BH = final_BC[:, cfg.hidden_dim:] if cfg.bidirectional else final_BC
  bridge = decoder[f'bridge_{top}']
  s0_BH = np.tanh(backward_BH @ bridge['kernel'] + bridge['bias'])
  keys_BSH = encoded['hidden'] @ decoder['key_projection']['kernel']
  score = decoder['step']['score']
  hidden_BSA = np.tanh((s0_BH @ score['query_kernel'][0])[:, None] + keys_BSH)
  logits_BS = np.where(batch['inputs_segment_ids_BS'] > 0, hidden_BSA @ score['vector'][0],
                       -np.inf)
  expected_BS = np.exp(logits_BS - logits_BS.max(-1, keepdims=True))
  assert_close(weights[:, 0], expected_BS / expected_BS.sum(-1, keepdims=True))


def test_segment_boundaries_restart_forward_and_backward_recurrences():
  segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  positions = jnp.array([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
  for given in (positions, None):
    starts, ends = rnn_seq2seq.segment_boundaries(segments, given)
    np.testing.assert_array_equal(starts[:, :5], [[1, 0, 0, 1, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(ends, [[0, 0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]])
  first, last = rnn_seq2seq.segment_extents(segments)
  np.testing.assert_array_equal(first[:, :2], [[0, 3], [0, 6]])
  np.testing.assert_array_equal(last[:, :2], [[2, 4], [6, 0]])


def test_dropout_only_when_not_deterministic():
  kind = 'none-lstm-uni'
  _, params = _model(kind)
  model = rnn_seq2seq.RNNSeq2Seq(_config(kind, dropout_rate=0.3))
  batch = _batch()
  # Deterministic, no dropout runs: it would ask for the 'dropout' RNG, which is not given.
  jax.eval_shape(functools.partial(model.apply, deterministic=True), {'params': params},
                 **batch)
  training = jax.jit(functools.partial(model.apply, deterministic=False))(
      {'params': params}, **batch, rngs={'dropout': jax.random.key(1, impl='rbg')})
  evaluation = _forward(kind)(params, batch)[0]
  assert np.isfinite(training).all() and np.abs(training - evaluation).max() > 1e-3


def test_output_projection_is_tied_when_the_widths_allow():
  def params(**changes):
    cfg = rnn_seq2seq.RNNSeq2SeqConfig(**{**TINY, **changes})
    variables = jax.eval_shape(rnn_seq2seq.RNNSeq2Seq(cfg).init, jax.random.key(0),
                               jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 2), jnp.int32))
    return nn.unbox(variables)['params'], nn.get_partition_spec(variables)['params']

  tied, specs = params(share_embeddings=True)
  assert set(tied) == {'embed', 'encoder', 'decoder'}
  assert tuple(specs['embed']['embedding']) == ('vocab', 'embed')
  wide, _ = params(share_embeddings=True, hidden_dim=12)  # h̃ is 12 wide, E = 8
  assert wide['output_projection']['kernel'].shape == (12, 13)
  bahdanau, _ = params(share_embeddings=True, hidden_dim=12, attention='bahdanau')
  assert 'output_projection' not in bahdanau  # its deep output is E wide
  untied, _ = params()
  assert {'source_embed', 'target_embed', 'output_projection'} <= set(untied)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  kind = 'luong-general-gru-uni-shared'
  _, params = _model(kind)
  model = rnn_seq2seq.RNNSeq2Seq(_config(kind, dtype='bfloat16'))
  shapes = jax.eval_shape(model.init, jax.random.key(0), _tokens(0, (BATCH, SOURCE_LEN)),
                          _tokens(1, (BATCH, TARGET_LEN)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes['params']))
  batch = _batch()
  logits = jax.jit(model.apply)({'params': params}, **batch)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  assert_close(logits, _forward(kind)(params, batch)[0], rtol=0, scale=5e-2)


def test_decoding_longer_than_max_len_is_refused():
  model, params = _model('none-lstm-uni')
  _, _, encoded = _forward('none-lstm-uni')(params, _batch())
  too_long = jnp.zeros((BATCH, model.config.max_len + 1), jnp.int32)
  with pytest.raises(ValueError, match=r'RNNSeq2SeqConfig\.max_len=8'):
    jax.eval_shape(functools.partial(model.init, method='decode', decode=True),
                   jax.random.key(0), too_long, encoded)


@pytest.mark.parametrize('change, message', [
    (dict(cell='foo'), "RNNSeq2SeqConfig.cell='foo' is not one of: gru, lstm"),
    (dict(attention='transformer'), 'RNNSeq2SeqConfig.attention='),
    (dict(luong_score='scaled_dot'), "RNNSeq2SeqConfig.luong_score='scaled_dot' is not one"),
    (dict(attention='bahdanau', input_feeding=True), 'RNNSeq2SeqConfig.input_feeding'),
    (dict(hidden_dim=0), 'RNNSeq2SeqConfig.hidden_dim'),
    (dict(num_layers=1.5), 'RNNSeq2SeqConfig.num_layers'),
    (dict(max_len=-1), 'RNNSeq2SeqConfig.max_len'),
    (dict(dropout_rate=1.0), 'RNNSeq2SeqConfig.dropout_rate'),
    (dict(dtype='int8'), 'RNNSeq2SeqConfig.dtype'),
    (dict(init_range=0.0), 'RNNSeq2SeqConfig.init_range'),
    (dict(recurrent_init='zeros'), 'RNNSeq2SeqConfig.recurrent_init'),
    (dict(bidirectional=1), 'RNNSeq2SeqConfig.bidirectional'),
])
def test_config_errors_name_the_field(change, message):
  with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
    rnn_seq2seq.RNNSeq2SeqConfig(**{**TINY, **change})
