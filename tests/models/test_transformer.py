"""The shared stacks' parts that GPT and BERT do not exercise: cross-attention, RMSNorm,
gated MLPs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models import transformer
from tests.tolerances import assert_close


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DecoderConfig(transformer.TransformerConfig):
  pass


CFG = _DecoderConfig(num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, position='none',
                     norm='rms', activation='swiglu', use_bias=False)


@pytest.fixture(scope='module')
def cross():
  decoder = transformer.Decoder(CFG, cross_attention=True)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  encoded = jax.random.normal(jax.random.key(2), (2, 7, 16))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  kwargs = dict(positions_BT=positions, key_positions_BS=positions)
  params = nn.unbox(decoder.init(jax.random.key(0), x, encoded_BSD=encoded, **kwargs))['params']
  run = lambda enc, **extra: decoder.apply({'params': params}, x, encoded_BSD=enc, **kwargs,
                                           **extra).hidden_BTD
  return params, run, encoded


def test_cross_attention_reads_the_encoding_within_its_segments(cross):
  params, run, encoded = cross
  assert {'cross_attention', 'ln_cross'} <= set(params['block_0'])
  assert 'bias' not in params['block_0']['ln_mlp']  # RMSNorm has no shift
  assert 'fc_gate' in params['block_0']['mlp']  # swiglu is gated
  base = run(encoded)
  assert np.abs(run(encoded.at[:, 3].add(1.0)) - base).max() > 1e-4
  # Encoder slots of segment 0 (padding) are invisible to every query.
  segments = jnp.array([[1] * 4 + [0] * 3] * 2)
  masked = run(encoded, encoder_segment_ids_BS=segments)
  assert_close(run(encoded.at[:, 5].set(9.0), encoder_segment_ids_BS=segments), masked)


def test_a_cross_attention_decoder_refuses_to_run_without_an_encoding(cross):
  _, run, _ = cross
  with pytest.raises(ValueError, match='encoded_BSD'):
    run(None)


def test_rms_norm_and_gated_mlp_follow_their_formulas():
  x = jax.random.normal(jax.random.key(3), (2, 3, 8)) * 3 + 1
  norm = layers.RMSNorm(epsilon=1e-6)
  params = norm.init(jax.random.key(0), x)
  expected = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-6)
  assert_close(norm.apply(params, x), expected)
  mlp = layers.Mlp(hidden_dim=6, activation='geglu', use_bias=False)
  p = nn.unbox(mlp.init(jax.random.key(0), x))['params']
  gate = jax.nn.gelu(x @ p['fc_in']['kernel'], approximate=False) * (x @ p['fc_gate']['kernel'])
  assert_close(mlp.apply({'params': p}, x), gate @ p['fc_out']['kernel'])
