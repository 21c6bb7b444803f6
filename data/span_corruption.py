"""T5's span corruption (Raffel et al. 2020, sec. 3.1.4), as pure numpy functions of
(tokens, seed): deterministic per example, so the pipeline that applies them resumes
exactly.

A fraction `noise_density` of the tokens (0.15 in T5) is dropped in spans of mean length
`mean_span_length` (3). Non-noise and noise spans alternate, a non-noise span first and a
noise span last, as T5's code has them. Each noise span becomes one sentinel in the
inputs; the targets list every sentinel followed by the span it replaced:

    tokens   Thank you  for  inviting  me  to  your  party  last  week
    inputs   Thank you <X>  me  to  your  party <Y>  EOS
    targets  <X> for inviting <Y> last week EOS

(The paper's figure also drops a middle span and so ends its targets with a third
sentinel; T5's code always ends on a noise span, and so do we.) Sentinels are the top ids of
the vocabulary, counting down: `sentinel_ids(vocab_size, n)[0]` is T5's <extra_id_0> =
vocab_size - 1.

`lengths_for(inputs_length, ...)` is how many raw tokens to corrupt so that the inputs
(EOS included) fill their row exactly, and how long the targets then are.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
  """The recipe: T5's defaults."""
  noise_density: float = 0.15
  mean_span_length: float = 3.0

  def __post_init__(self):
    if not 0.0 < self.noise_density < 1.0:
      raise ValueError(f'noise_density={self.noise_density} must lie in (0, 1)')
    if self.mean_span_length < 1.0:
      raise ValueError(f'mean_span_length={self.mean_span_length} must be >= 1')

  def counts(self, length: int) -> tuple[int, int]:
    """(noise tokens, noise spans) for `length` tokens, rounded as T5 rounds them: at
    least one noise and one non-noise token, at least one span, and no more spans than
    non-noise tokens to separate them (T5 would emit empty spans there)."""
    length = max(length, 2)
    num_noise = min(max(round(length * self.noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / self.mean_span_length), 1), length - num_noise)
    return num_noise, num_spans


def _segment(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """`num_items` split into `num_segments` non-empty runs at uniformly random cuts:
  their lengths, int64 [num_segments]."""
  cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def noise_mask(length: int, seed, recipe: SpanCorruption = SpanCorruption()) -> np.ndarray:
  """bool [length]: True on the noise tokens. Non-noise and noise spans alternate, a
  non-noise span first; both kinds are cut at uniformly random points, so each noise span
  has at least one token and their mean length is noise tokens / spans exactly."""
  num_noise, num_spans = recipe.counts(length)
  rng = np.random.default_rng(seed)
  padded = max(length, 2)
  noise_lengths = _segment(num_noise, num_spans, rng)
  kept_lengths = _segment(padded - num_noise, num_spans, rng)
  # [kept_0, noise_0, kept_1, noise_1, ...]: odd-numbered spans are noise.
  span_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
  span_of_token = np.repeat(np.arange(2 * num_spans), span_lengths)
  return (span_of_token % 2 == 1)[:length]


def sentinel_ids(vocab_size: int, count: int) -> np.ndarray:
  """The ids of <extra_id_0>, <extra_id_1>, ...: the top `count` ids, counting down."""
  return vocab_size - 1 - np.arange(count)


def apply_mask(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray,
               eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of T5's span corruption for a given noise mask.

  inputs: the non-noise tokens with each noise span replaced by one sentinel, then EOS.
  targets: the noise tokens with each non-noise span replaced by one sentinel, then EOS;
  the k-th sentinel marks the k-th noise span on both sides when the row starts with a
  non-noise token, as `noise_mask`'s rows do.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if tokens.shape != mask.shape or tokens.ndim != 1:
    raise ValueError(f'tokens {tokens.shape} and mask {mask.shape} must be one same 1-D shape')

  def replace_spans(dropped):
    # The first token of each dropped run becomes the run's sentinel; the rest go.
    starts = dropped & ~np.concatenate([[False], dropped[:-1]])
    span_index = np.cumsum(starts) - 1
    if starts.sum() > len(sentinels):
      raise ValueError(f'{int(starts.sum())} spans need more than the {len(sentinels)} '
                       'sentinel ids given')
    out = np.where(starts, sentinels[np.clip(span_index, 0, len(sentinels) - 1)], tokens)
    return np.append(out[~dropped | starts], eos_id).astype(tokens.dtype)

  return replace_spans(mask), replace_spans(~mask)


def span_corrupt(tokens: np.ndarray, seed, *, vocab_size: int, eos_id: int,
                 recipe: SpanCorruption = SpanCorruption()) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) for one example: its noise mask drawn from `seed` (any numpy seed:
  an int, or a tuple such as (run seed, example index))."""
  tokens = np.asarray(tokens)
  mask = noise_mask(len(tokens), seed, recipe)
  _, num_spans = recipe.counts(len(tokens))
  return apply_mask(tokens, mask, sentinel_ids(vocab_size, num_spans), eos_id)


def corrupted_lengths(tokens_length: int, recipe: SpanCorruption = SpanCorruption()
                      ) -> tuple[int, int]:
  """(inputs length, targets length), EOS included, after corrupting `tokens_length`
  tokens: inputs keep the non-noise tokens plus a sentinel per noise span, targets the
  noise tokens plus a sentinel per non-noise span (as many)."""
  num_noise, num_spans = recipe.counts(tokens_length)
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def lengths_for(inputs_length: int, recipe: SpanCorruption = SpanCorruption()
                ) -> tuple[int, int]:
  """(raw tokens per example, targets length): the most raw tokens whose corrupted inputs
  fit in `inputs_length` (EOS included), and the targets' length for them."""
  if inputs_length < 3:
    raise ValueError(f'inputs_length={inputs_length}: span corruption needs at least 3 '
                     '(a kept token, a sentinel, EOS)')
  tokens_length = 2
  while corrupted_lengths(tokens_length + 1, recipe)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, corrupted_lengths(tokens_length, recipe)[1]
