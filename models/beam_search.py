"""Beam search and sampling over a decode step function, for any seq2seq model.

A decode step is `step_fn(cache, tokens_b) -> (logits_bV float32, cache)`: `cache` is any
pytree (a Flax model's 'cache' collection after priming, see the seq2seq protocol),
`tokens_b` the tokens just emitted. Decoding starts from the logits of the first target
token (computed while priming) and the primed cache, one row per source:

    out = beam_search(step_fn, cache, first_logits_BV, beam_size=4, max_len=64, eos_id=1)
    best_BL = out.tokens_BRL[:, 0]

`step_fn` is a static argument of the jitted search: pass the same (or an equal, hashable)
object on every call to reuse the compilation, e.g. a frozen dataclass or a
`functools.partial` of a module-level function built once. Arrays it closes over are
compiled in as constants.

Dims: B sources, K beams per source, C = 2K candidates per source and step, R hypotheses
returned per source, V vocabulary, L max_len; b any number of rows (B·K inside the search).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
from jax import lax
import jax.numpy as jnp

from models import decoding

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]


@flax.struct.dataclass
class BeamOutput:
  """The R best finished hypotheses of each source, best first.

  A hypothesis ends with its EOS (or stops at max_len without one), then `pad_id`.
  """
  tokens_BRL: Array  # int32
  scores_BR: Array  # float32: log_probs / length_penalty(lengths), what ranks them
  log_probs_BR: Array  # float32: summed log-probabilities of the tokens
  lengths_BR: Array  # int32: tokens generated, EOS included


def length_penalty(length: Array, alpha: float | Array) -> Array:
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); alpha = 0 gives 1."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ------------------------------------------------------------------------ the cache


@dataclasses.dataclass(frozen=True)
class PerSource:
  """A cache leaf whose rows depend on the source only (cross-attention's keys and values,
  the source's segment ids), batch at `axis`: repeated for the K beams once, never
  reordered, since a surviving beam's parent is always a beam of the same source."""
  axis: int = 0


LeafAxis = int | PerSource
BatchAxis = LeafAxis | tuple[LeafAxis, ...]


def _map_batched(fn, cache: Any, batch_axis: BatchAxis) -> Any:
  """`fn(leaf, spec)` on every leaf that has its batch axis; other leaves kept.

  `batch_axis` is one spec for every leaf, or one per leaf in `jax.tree.leaves` order (a
  model whose scanned layers hold the batch at axis 1 beside its own caches at axis 0).
  """
  leaves, treedef = jax.tree.flatten(cache)
  specs = batch_axis if isinstance(batch_axis, tuple) else (batch_axis,) * len(leaves)
  if len(specs) != len(leaves):
    raise ValueError(f'batch_axis names {len(specs)} axes for a cache of {len(leaves)} leaves')
  axis = lambda spec: spec.axis if isinstance(spec, PerSource) else spec
  return jax.tree.unflatten(treedef, [leaf if leaf.ndim <= axis(spec) else fn(leaf, spec)
                                      for leaf, spec in zip(leaves, specs)])


def expand_cache(cache: Any, beam_size: int, batch_axis: BatchAxis = 0) -> Any:
  """Repeats every leaf with a batch axis K times, so row b*K + k is beam k of source b.

  Leaves with no axis `batch_axis` (step counters) are shared by all rows and kept.
  """
  def repeat(leaf, spec):
    return jnp.repeat(leaf, beam_size, axis=spec.axis if isinstance(spec, PerSource) else spec)
  return _map_batched(repeat, cache, batch_axis)


def gather_cache(cache: Any, rows_b: Array, batch_axis: BatchAxis = 0) -> Any:
  """The cache of rows `rows_b` (int32 [b], in bounds) along `batch_axis`; counters and
  `PerSource` leaves are kept."""
  def gather(leaf, spec):
    # mode='clip': the rows are in bounds, and clamping is cheaper than filling.
    return leaf if isinstance(spec, PerSource) else jnp.take(leaf, rows_b, axis=spec,
                                                            mode='clip')
  return _map_batched(gather, cache, batch_axis)


# ---------------------------------------------------------------------- beam search


@flax.struct.dataclass
class _BeamState:
  """The search after `step` tokens: K alive beams and the R best finished per source."""
  step: Array  # int32 scalar: tokens generated so far by every alive beam
  cache: Any  # rows B·K, in the order of the alive beams
  alive_tokens_BKL: Array  # int32, pad_id after `step`
  alive_log_probs_BK: Array  # sorted, best first; -inf for a beam that does not exist
  finished: BeamOutput


def _advance(state: _BeamState, logits_bV: Array, *, beam_size: int, max_len: int,
             batch_axis: BatchAxis, eos_id: Array, alpha: Array) -> _BeamState:
  """Extends every alive beam by one token: keeps the best finished and alive results."""
  num_sources, _, _ = state.alive_tokens_BKL.shape
  vocab = logits_bV.shape[-1]
  num_return = state.finished.scores_BR.shape[1]
  position = state.step  # where the new token goes; its hypothesis has length step + 1

  log_probs_BKV = jax.nn.log_softmax(logits_bV.reshape(num_sources, beam_size, vocab))
  totals_BKV = state.alive_log_probs_BK[:, :, None] + log_probs_BKV
  # 2K candidates: whatever ends in EOS, at least K remain to go on (each beam has one
  # EOS extension, so at most K of the 2K are EOS).
  candidate_log_probs_BC, flat_BC = lax.top_k(totals_BKV.reshape(num_sources, -1),
                                              2 * beam_size)
  parents_BC = flat_BC // vocab
  new_tokens_BC = (flat_BC % vocab).astype(jnp.int32)
  candidates_BCL = jnp.take_along_axis(state.alive_tokens_BKL, parents_BC[:, :, None], axis=1)
  candidates_BCL = candidates_BCL.at[:, :, position].set(new_tokens_BC)
  ends_BC = new_tokens_BC == eos_id

  # Finished: only the top K candidates (the beam proper) may finish, as in fairseq; the
  # next K only refill the alive beams. So beam_size=1 ends where greedy decoding ends.
  # At max_len every candidate of the beam finishes, EOS or not.
  in_beam_BC = jnp.arange(2 * beam_size) < beam_size
  finishing_BC = in_beam_BC & (ends_BC | (position + 1 == max_len))
  scores_BC = jnp.where(finishing_BC,
                        candidate_log_probs_BC / length_penalty(position + 1, alpha), -jnp.inf)
  pool_scores_BX = jnp.concatenate([state.finished.scores_BR, scores_BC], axis=1)
  scores_BR, keep_BR = lax.top_k(pool_scores_BX, num_return)  # old ones win ties

  def pick(old, new):
    pool = jnp.concatenate([old, new], axis=1)
    index = keep_BR.reshape(keep_BR.shape + (1,) * (pool.ndim - 2))
    return jnp.take_along_axis(pool, index, axis=1)

  finished = BeamOutput(
      tokens_BRL=pick(state.finished.tokens_BRL, candidates_BCL),
      scores_BR=scores_BR,
      log_probs_BR=pick(state.finished.log_probs_BR, candidate_log_probs_BC),
      lengths_BR=pick(state.finished.lengths_BR,
                      jnp.full_like(parents_BC, position + 1, jnp.int32)))

  # Alive: the best K candidates that did not just end in EOS.
  alive_log_probs_BK, survivors_BK = lax.top_k(
      jnp.where(ends_BC, -jnp.inf, candidate_log_probs_BC), beam_size)
  alive_tokens_BKL = jnp.take_along_axis(candidates_BCL, survivors_BK[:, :, None], axis=1)
  # Each survivor continues from its parent's cache, a row of the same source.
  parents_BK = jnp.take_along_axis(parents_BC, survivors_BK, axis=1)
  rows_b = (jnp.arange(num_sources)[:, None] * beam_size + parents_BK).reshape(-1)
  return _BeamState(step=state.step + 1,
                    cache=gather_cache(state.cache, rows_b, batch_axis),
                    alive_tokens_BKL=alive_tokens_BKL,
                    alive_log_probs_BK=alive_log_probs_BK,
                    finished=finished)


def _search_done(state: _BeamState, max_len: int, alpha: Array) -> Array:
  """True when, for every source, no alive beam can beat its R-th best finished score.

  An alive beam with log-prob x <= 0 ends, if ever, with some y <= x (log-probs only fall)
  at a length l in [step + 1, max_len], scoring y / lp(l) <= x / lp(l) <= x / max lp(l).
  lp grows with the length for alpha >= 0 (max at max_len) and shrinks for alpha < 0
  (max at step + 1), so x / max(lp(max_len), lp(step + 1)) bounds every final score.
  """
  largest_penalty = jnp.maximum(length_penalty(max_len, alpha),
                                length_penalty(state.step + 1, alpha))
  best_alive_B = state.alive_log_probs_BK[:, 0] / largest_penalty
  worst_kept_B = state.finished.scores_BR[:, -1]
  return jnp.all(best_alive_B <= worst_kept_B)


@functools.partial(jax.jit, static_argnames=('step_fn', 'beam_size', 'max_len', 'num_return',
                                             'batch_axis'))
def _beam_search(step_fn, cache, first_logits_BV, eos_id, pad_id, alpha, *, beam_size,
                 max_len, num_return, batch_axis):
  num_sources = first_logits_BV.shape[0]
  advance = functools.partial(_advance, beam_size=beam_size, max_len=max_len,
                              batch_axis=batch_axis, eos_id=eos_id, alpha=alpha)
  # The K beams of a source start identical: only beam 0 may extend at the first step,
  # else the same hypothesis would fill the beam K times.
  start_log_probs_BK = jnp.full((num_sources, beam_size), -jnp.inf).at[:, 0].set(0.0)
  state = _BeamState(
      step=jnp.array(0, jnp.int32),
      cache=expand_cache(cache, beam_size, batch_axis),
      alive_tokens_BKL=jnp.full((num_sources, beam_size, max_len), pad_id, jnp.int32),
      alive_log_probs_BK=start_log_probs_BK,
      finished=BeamOutput(
          tokens_BRL=jnp.full((num_sources, num_return, max_len), pad_id, jnp.int32),
          scores_BR=jnp.full((num_sources, num_return), -jnp.inf),
          log_probs_BR=jnp.full((num_sources, num_return), -jnp.inf),
          lengths_BR=jnp.zeros((num_sources, num_return), jnp.int32)))
  state = advance(state, jnp.repeat(first_logits_BV.astype(jnp.float32), beam_size, axis=0))

  def keep_going(state):
    return (state.step < max_len) & ~_search_done(state, max_len, alpha)

  def extend(state):
    # The step after the last token is never run: at max_len the loop has stopped.
    last_b = lax.dynamic_index_in_dim(state.alive_tokens_BKL, state.step - 1, axis=2,
                                      keepdims=False).reshape(-1)
    logits_bV, cache = step_fn(state.cache, last_b)
    return advance(state.replace(cache=cache), logits_bV.astype(jnp.float32))

  return lax.while_loop(keep_going, extend, state).finished


def _check_positive(name: str, value: int) -> None:
  if not (isinstance(value, int) and value >= 1):
    raise ValueError(f'{name} must be an int >= 1, got {value!r}')


def beam_search(step_fn: StepFn, cache: Any, first_logits_BV: Array, *, beam_size: int,
                max_len: int, eos_id: int, alpha: float = 0.6, num_return: int = 1,
                batch_axis: BatchAxis = 0, pad_id: int = 0) -> BeamOutput:
  """The `num_return` best hypotheses of each source under GNMT's length penalty.

  Each step extends the K alive beams of a source by every token and keeps the top 2K of
  the K·V candidates: those among the best K that end in EOS finish, and the best K that
  do not stay alive. Finished hypotheses are ranked by log_prob / ((5 + length) / 6) **
  alpha; a hypothesis still alive at max_len finishes there. The search stops at max_len,
  or once no alive beam of any source can beat that source's R-th best finished one.

  Args:
    step_fn: `(cache, tokens_b) -> (logits_bV, cache)`, a static (hashable) argument.
    cache: the primed cache, B rows along `batch_axis` in every leaf that has that axis.
    first_logits_BV: logits of the first target token of each source.
    beam_size: K >= 1; 1 is greedy decoding up to its EOS (alpha > 0 may still let the
      runner-up win on length afterwards).
    max_len: L >= 1, the most tokens generated, EOS included.
    eos_id: the token that ends a hypothesis.
    alpha: the length penalty's exponent; 0 ranks by the raw log-probability.
    num_return: R, 1 <= R <= K hypotheses returned per source.
    batch_axis: the cache's batch axis, or one per leaf in `jax.tree.leaves` order (1
      under scanned layers, 0 elsewhere; `PerSource(axis)` for a leaf no beam changes,
      which is then never reordered); leaves with no such axis are left as they are.
    pad_id: fills each hypothesis after its end.

  Returns:
    BeamOutput with `[B, R, L]` tokens and `[B, R]` scores, log-probs and lengths.
  """
  _check_positive('beam_size', beam_size)
  _check_positive('max_len', max_len)
  _check_positive('num_return', num_return)
  if num_return > beam_size:
    raise ValueError(f'num_return={num_return} exceeds beam_size={beam_size}')
  return _beam_search(step_fn, cache, jnp.asarray(first_logits_BV),
                      jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32),
                      jnp.asarray(alpha, jnp.float32), beam_size=beam_size, max_len=max_len,
                      num_return=num_return, batch_axis=batch_axis)


# ------------------------------------------------------------------------- sampling


@functools.partial(jax.jit, static_argnames=('step_fn', 'max_len', 'sampler'))
def _sample(step_fn, cache, first_logits_BV, rng, eos_id, pad_id, *, max_len, sampler):
  num_sources = first_logits_BV.shape[0]
  next_B = sampler(jax.random.fold_in(rng, 0), first_logits_BV.astype(jnp.float32))
  out_BL = jnp.full((num_sources, max_len), pad_id, jnp.int32).at[:, 0].set(next_B)

  def keep_going(state):
    step, _, _, _, done_B = state
    return (step < max_len) & ~jnp.all(done_B)

  def draw(state):
    step, cache, out_BL, last_B, done_B = state
    logits_BV, cache = step_fn(cache, last_B)
    next_B = sampler(jax.random.fold_in(rng, step), logits_BV.astype(jnp.float32))
    next_B = jnp.where(done_B, pad_id, next_B)
    out_BL = out_BL.at[:, step].set(next_B)
    return step + 1, cache, out_BL, next_B, done_B | (next_B == eos_id)

  state = (jnp.array(1, jnp.int32), cache, out_BL, next_B, next_B == eos_id)
  return lax.while_loop(keep_going, draw, state)[2]


def sample(step_fn: StepFn, cache: Any, first_logits_BV: Array, rng: Array, *, max_len: int,
           eos_id: int, sampler: decoding.Sampler | str = 'greedy', pad_id: int = 0) -> Array:
  """Greedy or sampled decoding: `[B, L]` int32 tokens, `pad_id` after a row's EOS.

  Token i is drawn with `fold_in(rng, i)` by a sampler of models/decoding.py (or the name
  of one, with its default settings); the loop ends once every row has emitted EOS.
  """
  if isinstance(sampler, str):
    sampler = decoding.make_sampler(sampler)
  _check_positive('max_len', max_len)
  return _sample(step_fn, cache, jnp.asarray(first_logits_BV), rng,
                 jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32),
                 max_len=max_len, sampler=sampler)
