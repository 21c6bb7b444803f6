"""Tests of models/beam_search.py on toy step functions whose logits depend on the history.

The toy model keeps a hash of each row's tokens in its cache and looks its logits up in a
random table, so a row continued from the wrong parent's cache gets other logits.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import beam_search as bs
from tests.tolerances import assert_close

EOS = 1
PAD = 9  # Outside every toy vocabulary, so padding is never mistaken for a token.


@dataclasses.dataclass(frozen=True)
class TableLM:
  """Logits = table[source, hash(history)] + counter_bias[step], from a seeded table.

  The hash is exact (one entry per history) while (vocab + 1) ** length <= modulus.
  Cache: 'ids' [b, 2] (hash, source) and a scalar step counter 'index'; with
  `layers_first` the layout of scanned layers: 'ids' [2, b] and an [2] counter
  (batch_axis=1). Frozen, so equal models hash alike and share the compilation.
  """
  vocab: int
  num_sources: int = 3
  seed: int = 0
  scale: float = 2.0
  counter_scale: float = 0.5
  modulus: int = 4099
  layers_first: bool = False
  overrides: tuple = ()  # ((source, history tuple, logits tuple), ...)

  def history_id(self, history) -> int:
    h = 0
    for token in history:
      h = (h * (self.vocab + 1) + token + 1) % self.modulus
    return h

  @functools.cached_property
  def tables(self) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(self.seed)
    table = rng.normal(size=(self.num_sources, self.modulus, self.vocab)) * self.scale
    counter_bias = rng.normal(size=(64, self.vocab)) * self.counter_scale
    for source, history, logits in self.overrides:
      table[source, self.history_id(history)] = logits
    return table.astype(np.float32), counter_bias.astype(np.float32)

  def _logits(self, source_b, h_b, index):
    table, counter_bias = self.tables
    return jnp.asarray(table)[source_b, h_b] + jnp.asarray(counter_bias)[index]

  def prime(self, sources):
    """(first logits, cache) of the given source ids."""
    source_b = jnp.asarray(sources, jnp.int32)
    ids_b2 = jnp.stack([jnp.zeros_like(source_b), source_b], axis=1)
    if self.layers_first:
      cache = {'ids': ids_b2.T, 'index': jnp.zeros((2,), jnp.int32)}
    else:
      cache = {'ids': ids_b2, 'index': jnp.zeros((), jnp.int32)}
    return self._logits(source_b, ids_b2[:, 0], 0), cache

  def __call__(self, cache, tokens_b):
    ids_b2 = cache['ids'].T if self.layers_first else cache['ids']
    h_b = (ids_b2[:, 0] * (self.vocab + 1) + tokens_b + 1) % self.modulus
    index = cache['index'] + 1
    ids_b2 = jnp.stack([h_b, ids_b2[:, 1]], axis=1)
    new_cache = {'ids': ids_b2.T if self.layers_first else ids_b2, 'index': index}
    step = index[0] if self.layers_first else index
    return self._logits(ids_b2[:, 1], h_b, step), new_cache

  # Numpy references.

  def log_probs(self, source, history) -> np.ndarray:
    """`[V]` float64 log-probabilities of the token after `history`."""
    table, counter_bias = self.tables
    logits = table[source, self.history_id(history)].astype(np.float64)
    logits = logits + counter_bias[len(history)]
    return logits - np.logaddexp.reduce(logits)

  def sequence_log_prob(self, source, tokens) -> float:
    return sum(self.log_probs(source, tokens[:i])[t] for i, t in enumerate(tokens))

  def greedy(self, source, max_len) -> list[int]:
    tokens = []
    while len(tokens) < max_len and EOS not in tokens:
      tokens.append(int(np.argmax(self.log_probs(source, tokens))))
    return tokens


def _penalty(length, alpha):
  return ((5 + length) / 6) ** alpha


def _search(model, sources, **kwargs):
  first_logits, cache = model.prime(sources)
  kwargs.setdefault('eos_id', EOS)
  kwargs.setdefault('pad_id', PAD)
  return jax.tree.map(np.asarray, bs.beam_search(model, cache, first_logits, **kwargs))


def _hypotheses(out, source_row):
  """The hypotheses of one source as token tuples, best first."""
  return [tuple(out.tokens_BRL[source_row, r, :length])
          for r, length in enumerate(out.lengths_BR[source_row])]


def _padded(tokens, max_len):
  return list(tokens) + [PAD] * (max_len - len(tokens))


# --------------------------------------------------------------------- beam search


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_of_one_is_greedy(alpha):
  model = TableLM(vocab=8, seed=4)
  sources, max_len = [0, 1, 2], 8
  out = _search(model, sources, beam_size=1, max_len=max_len, alpha=alpha)
  first_logits, cache = model.prime(sources)
  greedy = np.asarray(bs.sample(model, cache, first_logits, jax.random.key(0),
                                max_len=max_len, eos_id=EOS, pad_id=PAD))
  # With alpha > 0 a runner-up may still win on length after greedy's EOS (a beam of one
  # is greedy only up to there); on this model none does.
  np.testing.assert_array_equal(out.tokens_BRL[:, 0], greedy)
  for row, source in enumerate(sources):
    expected = model.greedy(source, max_len)
    np.testing.assert_array_equal(greedy[row], _padded(expected, max_len))
    assert out.lengths_BR[row, 0] == len(expected)
  # Some rows stop at EOS before max_len and some run to it, so both endings are compared.
  endings = {EOS in model.greedy(s, max_len) for s in sources}
  assert endings == {True, False}


def _brute_force(model, source, max_len, alpha):
  """Every hypothesis (ends in EOS, or reaches max_len): [(score, log_prob, tokens)]."""
  words = [t for t in range(model.vocab) if t != EOS]
  hypotheses = []
  for length in range(1, max_len + 1):
    for prefix in itertools.product(words, repeat=length - 1):
      hypotheses.append(prefix + (EOS,))
      if length == max_len:
        hypotheses.extend(prefix + (w,) for w in words)
  scored = []
  for tokens in hypotheses:
    log_prob = model.sequence_log_prob(source, tokens)
    scored.append((log_prob / _penalty(len(tokens), alpha), log_prob, tokens))
  return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_wide_beam_finds_the_brute_force_n_best(alpha):
  # 3 words + EOS, 4 tokens: 40 hypotheses end in EOS and 81 reach max_len. A beam of
  # 108 holds every candidate of every step (27 alive histories x 4 tokens at the last).
  model = TableLM(vocab=4, seed=2, scale=1.5)
  assert (model.vocab + 1) ** 4 <= model.modulus  # Every history has its own logits.
  sources, max_len, num_return = [0, 1, 2], 4, 6
  out = _search(model, sources, beam_size=108, max_len=max_len, alpha=alpha,
                num_return=num_return)
  for row, source in enumerate(sources):
    best = _brute_force(model, source, max_len, alpha)[:num_return]
    assert _hypotheses(out, row) == [tokens for _, _, tokens in best]
    assert_close(out.scores_BR[row], np.array([s for s, _, _ in best]))
    assert_close(out.log_probs_BR[row], np.array([lp for _, lp, _ in best]))
  # The winners have several lengths, so the length penalty decides between them.
  assert len({len(h) for row in range(3) for h in _hypotheses(out, row)}) > 1


def _trap():
  """A model where the likelier first token leads nowhere: 3 tokens, EOS = 1.

  After the empty history A=0 (p ~0.6) beats B=2 (p ~0.4); after A every token is about
  equally likely (~1/3), after B EOS is almost certain. Greedy: A then ~1/3, total ~0.2;
  B EOS totals ~0.4.
  """
  even = (0.0, 0.0, 0.0)
  rules = [((), (np.log(0.6), -9.0, np.log(0.4)))]
  rules += [((0,), (0.01, 0.0, -0.01))]
  rules += [((2,), (-9.0, 0.0, -9.0))]
  rules += [((0, t), even) for t in range(3)] + [((2, t), even) for t in range(3)]
  return TableLM(vocab=3, num_sources=1, counter_scale=0.0,
                 overrides=tuple((0, h, l) for h, l in rules))


def test_beam_of_two_beats_greedy():
  model = _trap()
  out = _search(model, [0], beam_size=2, max_len=3, alpha=0.0)
  greedy = model.greedy(0, 3)
  assert greedy[0] == 0
  assert _hypotheses(out, 0) == [(2, EOS)]
  assert out.log_probs_BR[0, 0] > model.sequence_log_prob(0, greedy) + 0.5
  np.testing.assert_array_equal(out.tokens_BRL[0, 0], [2, EOS, PAD])
  # A beam of one is greedy here.
  assert _hypotheses(_search(model, [0], beam_size=1, max_len=3, alpha=0.0), 0) == [
      tuple(greedy)]


def test_hypotheses_end_at_eos_then_pad_and_score_their_length():
  model = TableLM(vocab=8, seed=3)
  max_len, alpha = 6, 0.6
  out = _search(model, [0, 1, 2], beam_size=6, max_len=max_len, alpha=alpha, num_return=6)
  lengths = out.lengths_BR
  assert lengths.min() < max_len  # Some hypotheses end at EOS...
  for row in range(3):
    assert len(set(_hypotheses(out, row))) == 6  # ...all are different...
    assert (np.diff(out.scores_BR[row]) <= 0).all()  # ...and best first.
    for r in range(6):
      tokens, length = out.tokens_BRL[row, r], lengths[row, r]
      assert (tokens[length:] == PAD).all()
      assert EOS not in tokens[:length - 1]
      assert tokens[length - 1] == EOS or length == max_len
      log_prob = model.sequence_log_prob(row, tuple(tokens[:length]))
      assert_close(out.log_probs_BR[row, r], log_prob)
      assert_close(out.scores_BR[row, r], log_prob / _penalty(length, alpha))


def test_rows_are_independent():
  model = TableLM(vocab=8, seed=4)
  kwargs = dict(beam_size=3, max_len=7, alpha=0.6, num_return=2)
  alone = _search(model, [2], **kwargs)
  batched = _search(model, [0, 2, 1], **kwargs)
  np.testing.assert_array_equal(batched.tokens_BRL[1], alone.tokens_BRL[0])
  np.testing.assert_array_equal(batched.lengths_BR[1], alone.lengths_BR[0])
  assert_close(batched.scores_BR[1], alone.scores_BR[0])
  # The rows do differ, so a row copied from another would show.
  assert not np.array_equal(batched.tokens_BRL[0], batched.tokens_BRL[1])


def test_scanned_cache_layout_matches_batch_major():
  kwargs = dict(beam_size=3, max_len=6, alpha=0.6, num_return=3)
  batch_major = _search(TableLM(vocab=8, seed=5), [0, 1, 2], **kwargs)
  layers_first = _search(TableLM(vocab=8, seed=5, layers_first=True), [0, 1, 2],
                         batch_axis=1, **kwargs)
  np.testing.assert_array_equal(layers_first.tokens_BRL, batch_major.tokens_BRL)
  np.testing.assert_array_equal(layers_first.lengths_BR, batch_major.lengths_BR)
  assert_close(layers_first.scores_BR, batch_major.scores_BR)


_CALLS = []


@dataclasses.dataclass(frozen=True)
class Counted:
  """A step function that records each call it makes at run time."""
  model: TableLM

  def __call__(self, cache, tokens_b):
    jax.debug.callback(lambda: _CALLS.append(1))
    return self.model(cache, tokens_b)


def _rules_model(rules):
  """A 3-token model (EOS = 1) with the given logits after the given histories."""
  return TableLM(vocab=3, num_sources=1, counter_scale=0.0,
                 overrides=tuple((0, h, l) for h, l in rules))


def _ends_after_one_token():
  """Two first tokens equally likely (EOS is not), then EOS near certain (others ~e-20)."""
  return _rules_model([((), (0.0, -9.0, 0.0))] +
                      [((t,), (-20.0, 0.0, -20.0)) for t in range(3)])


def test_search_stops_once_no_alive_beam_can_win():
  # Once the two length-2 hypotheses finish, no alive beam can catch up, even with the
  # length bonus.
  model = _ends_after_one_token()
  first_logits, cache = model.prime([0])
  _CALLS.clear()
  out = bs.beam_search(Counted(model), cache, first_logits, beam_size=2, max_len=10,
                       eos_id=EOS, alpha=0.6, pad_id=PAD)
  jax.effects_barrier()
  assert out.lengths_BR[0, 0] == 2
  assert len(_CALLS) == 1  # One step after the first token, not max_len - 1.


def test_search_goes_on_while_a_longer_hypothesis_can_win_on_length():
  # A (p 0.55) is followed by a certain EOS; B (p 0.45) by certain Bs. With alpha = 1,
  # "A EOS" scores log 0.55 / (7/6) = -0.51, while B B has -0.80 / lp(3) = -0.60 so far
  # but ends as B x 6 with -0.80 / lp(6) = -0.44: stopping on the current length's
  # penalty instead of max_len's would return "A EOS".
  rules = [((), (np.log(0.55), -20.0, np.log(0.45))), ((0,), (-20.0, 0.0, -20.0))]
  rules += [((2,) * n, (-20.0, -20.0, 0.0)) for n in range(1, 6)]
  out = _search(_rules_model(rules), [0], beam_size=2, max_len=6, alpha=1.0)
  assert _hypotheses(out, 0) == [(2,) * 6]
  assert_close(out.scores_BR[0, 0], np.log(0.45) / (11 / 6), scale=1e-4)


@pytest.mark.parametrize('kwargs, message', [
    (dict(beam_size=0), 'beam_size'),
    (dict(num_return=3), 'num_return'),
    (dict(max_len=0), 'max_len'),
])
def test_bad_beam_settings_raise(kwargs, message):
  model = TableLM(vocab=4)
  settings = dict(beam_size=2, max_len=3) | kwargs
  with pytest.raises(ValueError, match=message):
    _search(model, [0], **settings)


# ------------------------------------------------------------------------- sampling


def test_sampling_depends_on_the_key_and_pads_after_eos():
  model = TableLM(vocab=8, seed=6, scale=0.5)  # Flat logits: draws vary.
  first_logits, cache = model.prime([0, 1, 2])

  def draw(seed):
    return np.asarray(bs.sample(model, cache, first_logits, jax.random.key(seed), max_len=8,
                                eos_id=EOS, sampler=bs.decoding.Temperature(1.0),
                                pad_id=PAD))

  first = draw(0)
  np.testing.assert_array_equal(draw(0), first)
  others = [draw(seed) for seed in (1, 2, 3)]
  assert all(not np.array_equal(first, other) for other in others)
  for tokens in [first] + others:
    for row in tokens:
      hits = np.flatnonzero(row == EOS)
      end = hits[0] + 1 if hits.size else len(row)
      assert ((row[:end] >= 0) & (row[:end] < 8)).all()
      assert (row[end:] == PAD).all()
  assert any((row == PAD).any() for tokens in others for row in tokens)


def test_draw_i_uses_the_key_folded_with_i():
  model = TableLM(vocab=8, seed=7, scale=0.5)
  sampler, rng, max_len = bs.decoding.TopK(k=4), jax.random.key(5), 6
  first_logits, cache = model.prime([0, 1])
  out = np.asarray(bs.sample(model, cache, first_logits, rng, max_len=max_len, eos_id=EOS,
                             sampler=sampler, pad_id=PAD))
  # The same draws, one eager step at a time.
  logits, expected = first_logits, []
  for i in range(max_len):
    tokens = sampler(jax.random.fold_in(rng, i), logits)
    if expected:
      tokens = jnp.where(jnp.asarray(expected[-1] == EOS) | (expected[-1] == PAD), PAD, tokens)
    expected.append(np.asarray(tokens))
    logits, cache = model(cache, tokens)
  np.testing.assert_array_equal(out, np.stack(expected, axis=1))


def test_sampling_stops_once_every_row_has_ended():
  model = _ends_after_one_token()
  first_logits, cache = model.prime([0, 0])
  _CALLS.clear()
  out = bs.sample(Counted(model), cache, first_logits, jax.random.key(0), max_len=10,
                  eos_id=EOS, pad_id=PAD)
  jax.effects_barrier()
  np.testing.assert_array_equal(out, [[0, EOS] + [PAD] * 8] * 2)
  assert len(_CALLS) == 1


def test_bad_sample_settings_raise():
  model = TableLM(vocab=4)
  first_logits, cache = model.prime([0])
  with pytest.raises(ValueError, match='max_len'):
    bs.sample(model, cache, first_logits, jax.random.key(0), max_len=0, eos_id=EOS)
  with pytest.raises(ValueError, match='unknown sampler'):
    bs.sample(model, cache, first_logits, jax.random.key(0), max_len=3, eos_id=EOS,
              sampler='beam')
