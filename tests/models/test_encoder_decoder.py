"""The encoder-decoder Transformer: shapes, packing, causality, cached decoding, configs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import encoder_decoder
from models import seq2seq_decoding
from tests.tolerances import assert_close

V, S, T = 29, 7, 6


def make(**changes):
  fields = dict(vocab_size=V, max_len=16, num_layers=2, num_heads=2, embed_dim=16,
                mlp_dim=32, norm_position='post', position='sinusoidal', sinusoid_scale=1.0,
                activation='relu')
  cfg = encoder_decoder.EncoderDecoderConfig(**{**fields, **changes})
  model = encoder_decoder.EncoderDecoder(cfg)
  inputs = jax.random.randint(jax.random.key(1), (2, S), 3, V)
  params = nn.unbox(model.init(jax.random.key(0), inputs))['params']
  return model, params


def teacher_forced(model, params, inputs, decoder_inputs, **kwargs):
  return model.apply({'params': params}, inputs, decoder_inputs, **kwargs)


def test_shapes_finite_and_shared_table():
  model, params = make()
  inputs = jax.random.randint(jax.random.key(1), (2, S), 3, V)
  targets = jax.random.randint(jax.random.key(2), (2, T), 3, V)
  logits = teacher_forced(model, params, inputs, targets)
  assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert set(params) == {'token_embed', 'encoder', 'decoder'}
  assert 'cross_attention' in params['decoder']['stack']['block_0']
  _, unshared = make(share_embeddings=False, tie_output=False)
  assert set(unshared) == {'token_embed', 'target_token_embed', 'encoder', 'decoder'}
  assert 'output' in unshared['decoder']


def test_scaled_embeddings_are_unit_sized():
  """sqrt(D) × a table at N(0, 1/D): unit entries, the size of unit sinusoids."""
  _, params = make(embed_dim=64, num_heads=4, mlp_dim=64)
  table = params['token_embed']['embedding']
  assert np.std(np.asarray(table) * 8.0) == pytest.approx(1.0, abs=0.1)


def test_decoder_is_causal_and_reads_the_source():
  model, params = make()
  inputs = jax.random.randint(jax.random.key(1), (1, S), 3, V)
  targets = jax.random.randint(jax.random.key(2), (1, T), 3, V)
  # Perturbing decoder input t changes logits at t and after, never before.
  base = teacher_forced(model, params, inputs, targets)
  changed = teacher_forced(model, params, inputs, targets.at[0, 3].set((targets[0, 3] + 1) % V))
  diff = np.abs(np.asarray(changed - base)).max(axis=-1)[0]
  assert (diff[:3] == 0).all() and (diff[3:] > 0).all()
  # Every target position depends on every source token (bidirectional encoder).
  other = teacher_forced(model, params, inputs.at[0, S - 1].set((inputs[0, S - 1] + 1) % V),
                         targets)
  assert (np.abs(np.asarray(other - base)).max(axis=-1)[0] > 0).all()


@pytest.mark.parametrize('norm_position', ['post', 'pre'])
def test_packed_rows_equal_their_examples_alone(norm_position):
  model, params = make(norm_position=norm_position, position='learned')
  rng = np.random.default_rng(0)
  src = [rng.integers(3, V, 3), rng.integers(3, V, 4)]
  tgt = [rng.integers(3, V, 2), rng.integers(3, V, 3)]
  # One row: source segments 1, 2 (+1 padding), target segments 1, 2 (+1 padding).
  packed_in = np.concatenate([*src, [0]])[None]
  packed_in_seg = np.array([[1] * 3 + [2] * 4 + [0]])
  packed_in_pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0]])
  packed_tgt = np.concatenate([*tgt, [0]])[None]
  packed_tgt_seg = np.array([[1] * 2 + [2] * 3 + [0]])
  packed_tgt_pos = np.array([[0, 1, 0, 1, 2, 0]])
  packed = teacher_forced(model, params, packed_in, packed_tgt,
                          inputs_segment_ids_BS=packed_in_seg, inputs_positions_BS=packed_in_pos,
                          targets_segment_ids_BT=packed_tgt_seg,
                          targets_positions_BT=packed_tgt_pos)
  starts = [0, 2]
  for k in range(2):
    alone = teacher_forced(model, params, src[k][None], tgt[k][None])
    assert_close(packed[0, starts[k]:starts[k] + len(tgt[k])], alone[0])


@pytest.mark.parametrize('changes', [
    dict(),
    dict(norm_position='pre', position='learned'),
    # Scanned T5 decoding is also checked token for token against transformers'
    # generate() in tests/hf/test_t5_parity.py; this one compiles for minutes on 2 cores.
    pytest.param(dict(position='t5', scan_layers=True), marks=pytest.mark.slow),
    dict(position='rope', num_decoder_layers=3, share_embeddings=False, tie_output=False),
])
def test_cached_decoding_equals_the_full_forward_pass(changes):
  model, params = make(**changes)
  inputs = jax.random.randint(jax.random.key(1), (2, S), 3, V)
  segments = jnp.ones((2, S), jnp.int32).at[1, 5:].set(0)  # row 1 has padding
  decoder_inputs = jax.random.randint(jax.random.key(2), (2, T), 3, V).at[:, 0].set(2)
  full = teacher_forced(model, params, inputs, decoder_inputs, inputs_segment_ids_BS=segments)
  encoded = model.apply({'params': params}, inputs, segment_ids_BS=segments, method='encode')
  logits, cache = seq2seq_decoding.prime(model, params, encoded, bos_id=2, max_len=T)
  stepped = [logits]
  for t in range(1, T):
    logits, cache = seq2seq_decoding.step(model, params, cache, decoder_inputs[:, t])
    stepped.append(logits)
  assert_close(jnp.stack(stepped, axis=1), full)


def test_cross_attention_keys_are_projected_once_per_source():
  """After priming, the source's keys/values live in the cache: steps do not read the
  encoding (there is none to read) and the projections run on the first call only."""
  model, params = make()
  inputs = jax.random.randint(jax.random.key(1), (2, S), 3, V)
  encoded = model.apply({'params': params}, inputs, method='encode')
  _, cache = seq2seq_decoding.prime(model, params, encoded, bos_id=2, max_len=T)
  layer = cache['decoder']['stack']['block_0']['cross_attention']
  assert layer['source_key'].shape == (2, 2, S, 8)  # [B, N, S, H]: the einsums' layout
  # A step reads the cached keys: zeroing them changes the step's logits.
  step = lambda c: seq2seq_decoding.step(model, params, c, jnp.full((2,), 5))[0]
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if 'source_value' in jax.tree_util.keystr(path) else x,
      cache)
  assert not np.allclose(step(cache), step(zeroed))


@pytest.mark.parametrize('field, value, message', [
    ('encoder_mask', 'causal', 'encoder_mask'),
    ('mask', 'bidirectional', 'mask'),
    ('num_decoder_layers', -1, 'num_decoder_layers'),
    ('vocab_size', 0, 'vocab_size'),
])
def test_bad_configs_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=f'EncoderDecoderConfig.{message}'):
    make(**{field: value})


def _scanned(params, num_layers):
  """An unrolled model's parameters for the same model with `scan_layers`."""
  def stack(tree):
    blocks = [tree.pop(f'block_{i}') for i in range(num_layers)]
    return {**tree, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
  return {**params, 'encoder': {'stack': stack(dict(params['encoder']['stack']))},
          'decoder': {**params['decoder'], 'stack': stack(dict(params['decoder']['stack']))}}


def test_beam_search_over_a_scanned_cache_matches_the_unrolled_model():
  """Scanned layers hold the batch at axis 1 of the cache: beams must be gathered there."""
  model, params = make()
  scanned_model, _ = make(scan_layers=True)
  inputs = jax.random.randint(jax.random.key(1), (2, S), 3, V)
  kwargs = dict(max_len=T, bos_id=2, eos_id=1, beam_size=3, num_return=2)
  tokens, scores = seq2seq_decoding.translate(model, params, inputs, **kwargs)
  scanned_tokens, scanned_scores = seq2seq_decoding.translate(
      scanned_model, _scanned(params, 2), inputs, **kwargs)
  np.testing.assert_array_equal(scanned_tokens, tokens)
  assert_close(scanned_scores, scores)
