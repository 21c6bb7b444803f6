"""Decoding a sequence-to-sequence model: encode once, prime the cache, then step.

A seq2seq model (models/encoder_decoder.py, models/rnn_seq2seq.py) has `encode(inputs, ...)
-> encoded` and `decode(decoder_inputs, encoded, ..., decode=True)` over a 'cache'
collection. Decoding here:

    encoded            = encode(inputs)                       once per source
    cache              = zeros shaped by init(dummy [B, L], encoded)
    logits_1, cache    = decode([BOS], encoded)               priming: the cache takes
                                                              what the steps need of the source
    logits_t+1, cache  = decode([y_t], None)                  one step per token

`translate` runs it all in one jitted function with beam search or a sampler
(models/beam_search.py) on top.

Dims as in attention.py, plus V (vocabulary), L (longest output), K (beam), R (returned).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import beam_search

Array = jax.Array


def init_cache(model: nn.Module, params: Any, encoded: dict[str, Array], max_len: int) -> Any:
  """An all-zero cache for decoding up to `max_len` tokens against `encoded`."""
  batch_size = jax.tree.leaves(encoded)[0].shape[0]
  dummy_BL = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), dummy_BL, encoded, decode=True, method='decode'))
  del params  # The cache's shapes depend on the model and the encoding alone.
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def step(model: nn.Module, params: Any, cache: Any, tokens_B: Array,
         encoded: dict[str, Array] | None = None) -> tuple[Array, Any]:
  """One decode call: the logits after `tokens_B` `[B, V]` and the updated cache.

  Pass `encoded` on the first call (priming) only.
  """
  logits_B1V, variables = model.apply(
      {'params': params, 'cache': cache}, tokens_B[:, None], encoded, decode=True,
      method='decode', mutable=['cache'])
  return logits_B1V[:, 0], variables['cache']


def prime(model: nn.Module, params: Any, encoded: dict[str, Array], *, bos_id: int,
          max_len: int) -> tuple[Array, Any]:
  """(logits of the first target token `[B, V]`, the primed cache)."""
  cache = init_cache(model, params, encoded, max_len)
  batch_size = encoded['segment_ids'].shape[0]
  return step(model, params, cache, jnp.full((batch_size,), bos_id, jnp.int32), encoded)


def cache_batch_axes(cache: Any, source_cache: frozenset[str] = frozenset()
                     ) -> tuple[beam_search.LeafAxis, ...]:
  """Each cache leaf's batch axis, in `jax.tree.leaves` order: 1 under scanned layers
  (`nn.scan` puts 'layers' first), 0 for the rest (the decoder's own position caches);
  leaves named in `source_cache` (the model's) are `PerSource`, never reordered."""
  specs = []
  for path, _ in jax.tree_util.tree_flatten_with_path(cache)[0]:
    names = [getattr(k, 'key', None) for k in path]
    axis = 1 if 'blocks' in names else 0
    specs.append(beam_search.PerSource(axis) if names[-1] in source_cache else axis)
  return tuple(specs)


@functools.partial(jax.jit, static_argnames=(
    'model', 'max_len', 'beam_size', 'num_return', 'sampler', 'bos_id', 'eos_id', 'pad_id'))
def _translate(model, params, inputs_BS, segment_ids_BS, rng, alpha, *, max_len, beam_size,
               num_return, sampler, bos_id, eos_id, pad_id):
  encoded = model.apply({'params': params}, inputs_BS, segment_ids_BS=segment_ids_BS,
                        method='encode')
  first_logits_BV, cache = prime(model, params, encoded, bos_id=bos_id, max_len=max_len)
  step_fn = functools.partial(step, model, params)
  if sampler is not None:
    tokens_BL = beam_search.sample(step_fn, cache, first_logits_BV, rng, max_len=max_len,
                                   eos_id=eos_id, sampler=sampler, pad_id=pad_id)
    return tokens_BL[:, None], None
  out = beam_search.beam_search(step_fn, cache, first_logits_BV, beam_size=beam_size,
                                max_len=max_len, eos_id=eos_id, alpha=alpha,
                                num_return=num_return, pad_id=pad_id,
                                batch_axis=cache_batch_axes(
                                    cache, getattr(model, 'source_cache', frozenset())))
  return out.tokens_BRL, out.scores_BR


def translate(model: nn.Module, params: Any, inputs_BS: Array, *, max_len: int, bos_id: int,
              eos_id: int, pad_id: int = 0, segment_ids_BS: Array | None = None,
              beam_size: int = 4, alpha: float = 0.6, num_return: int = 1,
              sampler: str | None = None, rng: Array | None = None
              ) -> tuple[Array, Array | None]:
  """Outputs `[B, R, L]` for each source row, and their beam scores `[B, R]`.

  Beam search (`beam_size`, GNMT length penalty `alpha`, the `num_return` best), or with
  `sampler` (a name of models/decoding.py: 'greedy', 'top_k', ...) one sample per row
  (R = 1, scores None). Outputs stop at `eos_id` (kept), then `pad_id`.
  """
  if segment_ids_BS is None:
    segment_ids_BS = jnp.ones(inputs_BS.shape, jnp.int32)
  if rng is None:
    rng = jax.random.key(0)
  return _translate(model, nn.unbox(params), jnp.asarray(inputs_BS, jnp.int32),
                    jnp.asarray(segment_ids_BS, jnp.int32), rng, jnp.float32(alpha),
                    max_len=max_len, beam_size=beam_size, num_return=num_return,
                    sampler=sampler, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
