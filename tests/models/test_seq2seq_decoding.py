"""models/seq2seq_decoding.py's cache bookkeeping: which leaves beam search reorders."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import beam_search
from models import encoder_decoder
from models import rnn_seq2seq
from models import seq2seq_decoding

V, S, T, BOS, EOS = 23, 7, 12, 2, 1


def _transformer(scan_layers=False):
  return encoder_decoder.EncoderDecoder(encoder_decoder.EncoderDecoderConfig(
      vocab_size=V, max_len=16, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32,
      scan_layers=scan_layers))


def _rnn(attention):
  return rnn_seq2seq.RNNSeq2Seq(rnn_seq2seq.RNNSeq2SeqConfig(
      vocab_size=V, max_len=16, embed_dim=8, hidden_dim=8, attention=attention,
      bidirectional=True))


MODELS = {'transformer': _transformer, 'transformer-scanned': lambda: _transformer(True),
          'rnn-bahdanau': lambda: _rnn('bahdanau'), 'rnn-none': lambda: _rnn('none')}


def _primed(name):
  model = MODELS[name]()
  inputs = jax.random.randint(jax.random.key(1), (4, S), 3, V)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs))['params']
  # Weights N(0, 0.5): logits neither flat nor one-hot, so beams overtake each other and
  # survivors continue from other beams' caches.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)
  encoded = model.apply({'params': params}, inputs, method='encode')
  first_logits, cache = seq2seq_decoding.prime(model, params, encoded, bos_id=BOS, max_len=T)
  return model, params, first_logits, cache


@pytest.mark.parametrize('name', MODELS)
def test_per_source_leaves_exist_and_leave_the_search_unchanged(name):
  """Leaves the model names as per-source are in its cache, and searching without
  reordering them gives what reordering every leaf gives: no beam ever changed them."""
  model, params, first_logits, cache = _primed(name)
  names = {getattr(path[-1], 'key', None)
           for path, _ in jax.tree_util.tree_flatten_with_path(cache)[0]}
  # Without attention an RNN keeps no memory of the source, only its segment ids.
  expected = {'segment_ids_B'} if name == 'rnn-none' else model.source_cache
  assert model.source_cache & names == expected, model.source_cache - names
  per_source = seq2seq_decoding.cache_batch_axes(cache, model.source_cache)
  every_leaf = seq2seq_decoding.cache_batch_axes(cache)
  assert any(isinstance(a, beam_search.PerSource) for a in per_source)
  assert not any(isinstance(a, beam_search.PerSource) for a in every_leaf)
  step_fn = functools.partial(seq2seq_decoding.step, model, params)
  search = lambda axes: beam_search.beam_search(
      step_fn, cache, first_logits, beam_size=4, max_len=T, eos_id=EOS, num_return=4,
      batch_axis=axes)
  ours, reference = search(per_source), search(every_leaf)
  np.testing.assert_array_equal(ours.tokens_BRL, reference.tokens_BRL)
  np.testing.assert_array_equal(ours.scores_BR, reference.scores_BR)
  # The sources' hypotheses differ between beams: the comparison is not vacuous.
  assert len({tuple(t) for t in np.asarray(reference.tokens_BRL[0])}) > 1
