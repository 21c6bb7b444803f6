"""KV-cache decoding of a decoder-only prefix LM (T5's 'prefix LM'): the prompt is the
prefix, read bidirectionally; the generated tokens are causal. Checked against the full
forward pass with `prefix_lengths_B` = the prompt lengths."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding
from models import gpt
from tests.tolerances import assert_close

CONFIG = gpt.GPTConfig(vocab_size=24, max_len=16, num_layers=2, num_heads=2, embed_dim=16,
                       mlp_dim=32, mask='prefix_lm')
# Chosen so that a causal prompt would change the greedy continuation of every row with
# two tokens or more (checked below): the argmax checks then see the prefix.
PROMPTS = [[13, 8, 4, 10, 17], [22], [23, 5, 1], [23, 16]]
NEW = 5
WIDTH = 5 + NEW  # Of a full pass over prompt and continuation (right-padded).


def _random_params(config, seed=0):
  """N(0, 0.5) weights (norm scales around 1): greedy outputs vary from token to token,
  and a prompt token's influence on its neighbours is far above rounding."""
  init = functools.partial(gpt.GPT(config).init, prefix_lengths_B=jnp.ones((1,), jnp.int32))
  shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    mean = 1.0 if path[-1].key == 'scale' else 0.0
    return jnp.asarray(rng.normal(mean, 0.5, shape.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes)['params'])


@pytest.fixture(scope='module')
def lm():
  return gpt.GPT(CONFIG), _random_params(CONFIG)


@functools.cache
def _full_forward(model):
  return jax.jit(lambda params, tokens, prefix: model.apply(
      {'params': params}, tokens, prefix_lengths_B=prefix))


@functools.cache
def _causal_forward(model):
  """The same weights under the causal mask."""
  causal = gpt.GPT(dataclasses.replace(model.config, mask='causal'))
  return jax.jit(lambda params, tokens: causal.apply({'params': params}, tokens))


@functools.cache
def _decode_step(model):
  return jax.jit(lambda variables, tokens, segments, positions, prefix: model.apply(
      variables, tokens, segment_ids_BT=segments, positions_BT=positions,
      prefix_lengths_B=prefix, decode=True, mutable=['cache']))


def _right_padded(rows, width):
  tokens = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    tokens[b, :len(row)] = row
  return jnp.asarray(tokens)


def _cached_logits(model, params, prompts, continuations, chunk=False):
  """Logits of a prompt call (left-aligned, prefix = the prompts), then of the
  continuation but its last token, fed one call per token as `generate` does (or in one
  `chunk`, causal within it): per row `[n + L - 1, V]` for n prompt and L new tokens."""
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  width, new = max(len(p) for p in prompts), continuations.shape[1]
  tokens, segments, positions = decoding.left_align(_right_padded(prompts, width), lengths, 0)
  prefix = jnp.full((len(prompts),), width, jnp.int32)  # Cache slots: every prompt ends at P.
  step = _decode_step(model)
  cache = decoding.init_cache(model, len(prompts), width + new)
  logits, mutated = step({'params': params, 'cache': cache}, tokens, segments, positions,
                         prefix)
  chunks = [logits]
  bounds = [0, new - 1] if chunk else list(range(new))  # The tokens fed: [0, new - 1).
  for i, j in zip(bounds[:-1], bounds[1:]):
    logits, mutated = step({'params': params, 'cache': mutated['cache']},
                           continuations[:, i:j], jnp.ones((len(prompts), j - i), jnp.int32),
                           lengths[:, None] + jnp.arange(i, j), prefix)
    chunks.append(logits)
  logits = np.asarray(jnp.concatenate(chunks, axis=1))
  return [logits[b, width - len(p):] for b, p in enumerate(prompts)]


def test_cached_generation_equals_the_full_prefix_lm_forward(lm):
  model, params = lm
  out = np.asarray(decoding.generate(model, params, PROMPTS, jax.random.key(0),
                                     max_new_tokens=NEW))
  lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
  tokens = _right_padded([p + list(o) for p, o in zip(PROMPTS, out)], WIDTH)
  full = np.asarray(_full_forward(model)(params, tokens, lengths))
  full_causal = np.asarray(_causal_forward(model)(params, tokens))
  by_step = _cached_logits(model, params, PROMPTS, jnp.asarray(out))
  in_chunk = _cached_logits(model, params, PROMPTS, jnp.asarray(out), chunk=True)
  for b, prompt in enumerate(PROMPTS):
    n = len(prompt)
    # Each generated token is the argmax of the full pass at the slot before it, ...
    np.testing.assert_array_equal(out[b], np.argmax(full[b, n - 1:n - 1 + NEW], axis=-1))
    # ... which a causal prompt would have changed.
    if n > 1:
      assert (out[b] != np.argmax(full_causal[b, n - 1:n - 1 + NEW], axis=-1)).any()
    # Every cached logit (the prompt's, read bidirectionally, and each new token's) is
    # the full pass's.
    assert_close(by_step[b], full[b, :n + NEW - 1])
    assert_close(in_chunk[b], full[b, :n + NEW - 1])


def test_the_prompt_call_reads_the_prompt_bidirectionally(lm):
  """Fails if decoding masked the prompt causally (or cut the prefix short)."""
  model, params = lm
  # Shapes as in the test above, so the compilations are shared.
  prompts = [[5, 3, 8, 1, 9], [5, 3, 8, 1, 4], [7, 7, 2], [4, 6]]
  continuations = np.full((4, NEW), 11, np.int32)
  cached = _cached_logits(model, params, prompts, jnp.asarray(continuations))
  # The first prompt token's output sees the last one (rows 0 and 1 differ only there).
  assert np.abs(cached[0][0] - cached[1][0]).max() > 0.1
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  tokens = _right_padded([p + list(c) for p, c in zip(prompts, continuations)], WIDTH)
  full_prefix = np.asarray(_full_forward(model)(params, tokens, lengths))
  full_causal = np.asarray(_causal_forward(model)(params, tokens))
  for b, prompt in enumerate(prompts):
    n = len(prompt)
    assert_close(cached[b], full_prefix[b, :n + NEW - 1])
    # The first generated token's logits: the masks disagree there on these weights.
    assert np.abs(full_prefix[b, n - 1] - full_causal[b, n - 1]).max() > 0.1


def test_generate_with_a_scanned_rematerialised_prefix_lm():
  """Prefix lengths travel through `nn.scan` and `nn.remat` to every layer."""
  config = dataclasses.replace(CONFIG, scan_layers=True, remat='full')
  model, params = gpt.GPT(config), _random_params(config, seed=1)
  out = np.asarray(decoding.generate(model, params, PROMPTS[1:], jax.random.key(0),
                                     max_new_tokens=3))
  lengths = jnp.asarray([len(p) for p in PROMPTS[1:]], jnp.int32)
  full = np.asarray(_full_forward(model)(
      params, _right_padded([p + list(o) for p, o in zip(PROMPTS[1:], out)], 6), lengths))
  for b, prompt in enumerate(PROMPTS[1:]):
    n = len(prompt)
    np.testing.assert_array_equal(out[b], np.argmax(full[b, n - 1:n + 2], axis=-1))


def test_decode_mode_prefix_lengths_only_for_the_prefix_lm_mask(lm):
  model, params = lm
  tokens = jnp.array([[5, 3, 8]])
  cache = decoding.init_cache(model, 1, 3)
  with pytest.raises(ValueError, match='needs prefix_lengths_B'):
    model.apply({'params': params, 'cache': cache}, tokens, decode=True, mutable=['cache'])
  causal = gpt.GPT(dataclasses.replace(CONFIG, mask='causal'))
  with pytest.raises(ValueError, match="prefix_lengths_B is for the 'prefix_lm' mask"):
    causal.apply({'params': params, 'cache': cache}, tokens, prefix_lengths_B=jnp.array([3]),
                 decode=True, mutable=['cache'])
