"""Tests of models/decoding.py: samplers on fixed logits, and KV-cache generation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding
from models import gpt

NUM_DRAWS = 2000


def _draws(sampler, logits_BV, seed=0):
  """`[NUM_DRAWS, B]` tokens, one row per rng."""
  keys = jax.random.split(jax.random.key(seed, impl='rbg'), NUM_DRAWS)  # Compiles fast.
  return np.asarray(jax.jit(jax.vmap(lambda key: sampler(key, logits_BV)))(keys))


# -------------------------------------------------------------------------- samplers


def test_greedy_is_argmax():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 11)), jnp.float32)
  tokens = decoding.make_sampler('greedy')(jax.random.key(1), logits)
  assert tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_top_k_never_leaves_the_top_k():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10)), jnp.float32) * 3
  draws = _draws(decoding.TopK(k=3, temperature=2.0), logits)
  for row in range(2):
    top3 = set(np.argsort(-np.asarray(logits[row]))[:3])
    assert set(draws[:, row]) == top3  # Never outside, and every member is reachable.


@pytest.mark.parametrize('p, nucleus', [(0.75, {7, 2}), (0.85, {7, 2, 5}), (1.0, set(range(8)))])
def test_top_p_never_leaves_the_nucleus(p, nucleus):
  probs = np.full(8, 0.01)
  probs[[7, 2, 5, 0]] = [0.5, 0.3, 0.1, 0.04]  # Sums to 1 with the four 0.01s.
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  draws = _draws(decoding.TopP(p=p), logits)
  assert set(draws[:, 0]) == nucleus


def test_low_temperature_approaches_greedy():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10)), jnp.float32)
  greedy = np.argmax(logits, axis=-1)
  cold = _draws(decoding.Temperature(1e-6), logits)
  assert (cold == greedy).all()
  warm = _draws(decoding.Temperature(1.0), logits)
  assert not (warm == greedy).all()


@pytest.mark.parametrize('name, settings, message', [
    ('temperature', dict(temperature=0.0), 'temperature'),
    ('top_k', dict(k=0), 'k >= 1'),
    ('top_p', dict(p=1.5), '0 < p <= 1'),
    ('beam', dict(), 'unknown sampler'),
])
def test_bad_sampler_settings_raise(name, settings, message):
  with pytest.raises(ValueError, match=message):
    decoding.make_sampler(name, **settings)


# ------------------------------------------------------------------------ generation


@pytest.fixture(scope='module')
def lm():
  """A tiny GPT with large random weights, so greedy outputs vary from token to token."""
  config = gpt.GPTConfig(vocab_size=24, max_len=24, num_layers=2, num_heads=2, embed_dim=16,
                         mlp_dim=32)
  model = gpt.GPT(config)

  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)

  def draw(path, shape):
    # N(0, 0.5) weights (norm scales around 1): greedy outputs differ by position.
    mean = 1.0 if path[-1].key == 'scale' else 0.0
    return jnp.asarray(rng.normal(mean, 0.5, shape.shape), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes)['params'])


PROMPTS = [[5, 3, 8, 1, 9], [7], [2, 2, 6]]


def test_left_align_exact():
  tokens, segments, positions = decoding.left_align(
      jnp.array([[5, 3, 8], [7, 0, 0]]), jnp.array([3, 1]), pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 3, 8], [0, 0, 7]])
  np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])


def test_generation_continues_the_full_forward_greedily(lm):
  model, params = lm
  prompt = PROMPTS[0]
  out = np.asarray(decoding.generate(model, params, [prompt], jax.random.key(0),
                                     max_new_tokens=6))
  assert out.shape == (1, 6) and out.dtype == np.int32
  # Each new token is the argmax of a plain forward pass over everything before it.
  sequence = list(prompt) + list(out[0])
  logits = jax.jit(model.apply)({'params': params}, jnp.array([sequence]))
  np.testing.assert_array_equal(out[0], np.argmax(logits[0, len(prompt) - 1:-1], axis=-1))
  assert len(set(out[0])) > 1  # The model is not degenerate, so the check has teeth.


def test_batched_prompts_of_different_lengths_match_each_alone(lm):
  model, params = lm
  batched = decoding.generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=6)
  for row, prompt in enumerate(PROMPTS):
    alone = decoding.generate(model, params, [prompt], jax.random.key(0), max_new_tokens=6)
    np.testing.assert_array_equal(batched[row], alone[0])
  # A right-padded array with lengths is the same request.
  padded = np.zeros((3, 5), np.int32)
  for row, prompt in enumerate(PROMPTS):
    padded[row, :len(prompt)] = prompt
  from_array = decoding.generate(model, params, padded, jax.random.key(0), max_new_tokens=6,
                                 prompt_lengths=np.array([5, 1, 3]))
  np.testing.assert_array_equal(from_array, batched)


def test_rows_stop_at_eos_and_pad_after(lm):
  model, params = lm
  free = np.asarray(decoding.generate(model, params, PROMPTS, jax.random.key(0),
                                      max_new_tokens=6))
  eos = int(free[0, 2])
  stopped = np.asarray(decoding.generate(model, params, PROMPTS, jax.random.key(0),
                                         max_new_tokens=6, eos_id=eos, pad_id=23))
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(free[row] == eos)
    end = hits[0] + 1 if hits.size else 6
    np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
    assert (stopped[row, end:] == 23).all()


def test_sampling_is_reproducible_and_in_range(lm):
  model, params = lm
  sampler = decoding.TopK(k=4, temperature=1.5)
  first = decoding.generate(model, params, PROMPTS, jax.random.key(3, impl='rbg'), max_new_tokens=6,
                            sampler=sampler)
  again = decoding.generate(model, params, PROMPTS, jax.random.key(3, impl='rbg'), max_new_tokens=6,
                            sampler=sampler)
  np.testing.assert_array_equal(first, again)
  assert ((np.asarray(first) >= 0) & (np.asarray(first) < 24)).all()
  # The key decides the draws: other keys give other continuations (not only the first's).
  others = [decoding.generate(model, params, PROMPTS, jax.random.key(seed, impl='rbg'),
                              max_new_tokens=6, sampler=sampler) for seed in (4, 5)]
  assert all(not np.array_equal(first, other) for other in others)
  assert not np.array_equal(others[0], others[1])


def test_generation_longer_than_max_len_is_refused(lm):
  model, params = lm
  with pytest.raises(ValueError, match='max_len=24'):
    decoding.generate(model, params, PROMPTS, jax.random.key(0), max_new_tokens=20)
  with pytest.raises(ValueError, match='at least one token'):
    decoding.generate(model, params, [[1], []], jax.random.key(0), max_new_tokens=2)
