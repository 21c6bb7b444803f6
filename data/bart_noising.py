"""BART's five noising functions (Lewis et al. 2020, sec. 2.2), as pure numpy functions of
(tokens, seed) that compose in fairseq's order.

A document is a 1-D array `[BOS, t_1, ..., t_n, EOS]`; every function keeps BOS and EOS in
place and noises the inner tokens only:

- token masking: a fraction `rate` of the inner tokens becomes [MASK] each;
- token deletion: a fraction `rate` of the inner tokens is removed (the model must find
  where);
- text infilling: spans with lengths ~ Poisson(λ) are drawn until they cover a fraction
  `rate` of the inner tokens; each span becomes ONE [MASK] (the model must also find how
  many tokens are missing), and a zero-length span inserts a [MASK];
- sentence permutation: the sentences (runs ending in a sentence-end token) are shuffled;
- document rotation: the document is rotated to begin at a uniformly chosen token.

`noise(tokens, seed, recipe)` applies the recipe's functions in fairseq's order
(permutation, then masking/deletion/infilling, then rotation), each with its own stream of
random numbers drawn from `seed`.
"""

import dataclasses

import numpy as np

Seed = int | tuple[int, ...]


def _inner(tokens) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or len(tokens) < 2:
    raise ValueError(f'a document is [BOS, ..., EOS], 1-D with at least 2 tokens; got '
                     f'shape {tokens.shape}')
  return tokens[1:-1]


def _rewrap(tokens, inner) -> np.ndarray:
  tokens = np.asarray(tokens)
  return np.concatenate([tokens[:1], inner, tokens[-1:]]).astype(tokens.dtype)


def _count(rate: float, n: int) -> int:
  """How many of n tokens a rate noises: rounded up, as fairseq's ceil(n · p)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'rate={rate} must lie in [0, 1]')
  return min(int(np.ceil(rate * n)), n)


def mask_tokens(tokens, seed: Seed, *, rate: float, mask_id: int) -> np.ndarray:
  """⌈rate · n⌉ inner tokens, chosen uniformly without replacement, become `mask_id`."""
  inner = _inner(tokens).copy()
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(inner), size=_count(rate, len(inner)), replace=False)
  inner[chosen] = mask_id
  return _rewrap(tokens, inner)


def delete_tokens(tokens, seed: Seed, *, rate: float) -> np.ndarray:
  """⌈rate · n⌉ inner tokens, chosen uniformly without replacement, are removed."""
  inner = _inner(tokens)
  rng = np.random.default_rng(seed)
  keep = np.ones(len(inner), bool)
  keep[rng.choice(len(inner), size=_count(rate, len(inner)), replace=False)] = False
  return _rewrap(tokens, inner[keep])


def infill_spans(length: int, seed: Seed, *, rate: float, poisson_lambda: float = 3.0
                 ) -> list[tuple[int, int]]:
  """(start, span length) pairs over `length` inner tokens, in order, not overlapping.

  Lengths ~ Poisson(λ) are drawn until they sum to at least ⌈rate · length⌉, the last one
  cut so that the sum is exact. The spans, in the order drawn, are then laid among the
  kept tokens uniformly: k spans and m kept tokens in a row of m + k slots, the spans at k
  slots chosen without replacement (stars and bars), so exactly ⌈rate · length⌉ tokens
  are covered and two spans may touch (two [MASK]s in a row) but never overlap.
  """
  target = _count(rate, length)
  if target and poisson_lambda <= 0:
    raise ValueError(f'poisson_lambda={poisson_lambda}: spans of mean length 0 never cover '
                     'a token')
  rng = np.random.default_rng(seed)
  lengths: list[int] = []
  while sum(lengths) < target:
    lengths.append(int(rng.poisson(poisson_lambda)))
  if not lengths:
    return []
  lengths[-1] -= sum(lengths) - target
  slots = np.sort(rng.choice(length - target + len(lengths), size=len(lengths),
                             replace=False))
  covered_before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  # Span i has (slot_i - i) kept tokens before it, and the spans before it.
  starts = slots - np.arange(len(lengths)) + covered_before
  return [(int(a), int(b)) for a, b in zip(starts, lengths)]


def infill(tokens, seed: Seed, *, rate: float, mask_id: int,
           poisson_lambda: float = 3.0) -> np.ndarray:
  """Text infilling: each span of `infill_spans` is replaced by one `mask_id` (a
  zero-length span inserts one)."""
  inner = _inner(tokens)
  out, cursor = [], 0
  for start, span in infill_spans(len(inner), seed, rate=rate,
                                  poisson_lambda=poisson_lambda):
    out.extend(inner[cursor:start])
    out.append(mask_id)
    cursor = start + span
  out.extend(inner[cursor:])
  return _rewrap(tokens, np.asarray(out, np.asarray(tokens).dtype))


def permute_sentences(tokens, seed: Seed, *, sentence_end_ids: tuple[int, ...]
                      ) -> np.ndarray:
  """The inner tokens' sentences in a random order. A sentence ends with (and includes) a
  token of `sentence_end_ids`; trailing tokens without one are a last sentence."""
  inner = _inner(tokens)
  ends = np.flatnonzero(np.isin(inner, sentence_end_ids)) + 1
  bounds = np.concatenate([[0], ends[ends < len(inner)], [len(inner)]])
  sentences = [inner[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sentences))
  shuffled = [sentences[i] for i in order]
  return _rewrap(tokens, np.concatenate(shuffled) if shuffled else inner)


def rotate(tokens, seed: Seed) -> np.ndarray:
  """Document rotation: the inner tokens rotated to begin at a uniformly chosen one."""
  inner = _inner(tokens)
  if len(inner) < 2:
    return np.asarray(tokens).copy()
  start = int(np.random.default_rng(seed).integers(len(inner)))
  return _rewrap(tokens, np.roll(inner, -start))


@dataclasses.dataclass(frozen=True)
class BartNoising:
  """Which functions run, and their rates; every rate 0 / flag False is the identity.
  BART's best recipe (paper, sec. 5): infilling at 0.3 with λ = 3 and sentence permutation.
  """
  mask_rate: float = 0.0
  delete_rate: float = 0.0
  infill_rate: float = 0.0
  poisson_lambda: float = 3.0
  permute_sentences: bool = False
  rotate: bool = False

  def __post_init__(self):
    for name in ('mask_rate', 'delete_rate', 'infill_rate'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'{name}={getattr(self, name)} must lie in [0, 1]')
    if self.poisson_lambda <= 0:
      raise ValueError(f'poisson_lambda={self.poisson_lambda} must be > 0')


def noise(tokens, seed: Seed, recipe: BartNoising, *, mask_id: int,
          sentence_end_ids: tuple[int, ...] = ()) -> np.ndarray:
  """The recipe's functions in fairseq's order, each seeded by (seed, its own index)."""
  seed = seed if isinstance(seed, tuple) else (seed,)
  out = np.asarray(tokens)
  if recipe.permute_sentences:
    if not sentence_end_ids:
      raise ValueError('permute_sentences needs sentence_end_ids')
    out = permute_sentences(out, (*seed, 0), sentence_end_ids=sentence_end_ids)
  if recipe.mask_rate:
    out = mask_tokens(out, (*seed, 1), rate=recipe.mask_rate, mask_id=mask_id)
  if recipe.delete_rate:
    out = delete_tokens(out, (*seed, 2), rate=recipe.delete_rate)
  if recipe.infill_rate:
    out = infill(out, (*seed, 3), rate=recipe.infill_rate, mask_id=mask_id,
                 poisson_lambda=recipe.poisson_lambda)
  if recipe.rotate:
    out = rotate(out, (*seed, 4))
  return out


# The spec's names of BartNoising's fields: a rate takes '=value', a flag stands alone.
_SPEC_RATES = {'mask': 'mask_rate', 'delete': 'delete_rate', 'infill': 'infill_rate',
               'lambda': 'poisson_lambda'}
_SPEC_FLAGS = {'permute': 'permute_sentences', 'rotate': 'rotate'}


def parse(spec: str) -> BartNoising:
  """A recipe from a config string: comma-separated 'mask=0.3', 'delete=0.3',
  'infill=0.3', 'lambda=3', 'permute', 'rotate'; '' or 'none' is the identity.

    parse('infill=0.3,permute')  # BART's best: BartNoising(infill_rate=0.3, permute...)
  """
  fields = {}
  for item in filter(None, (s.strip() for s in spec.split(','))):
    if item == 'none':
      continue
    name, eq, value = item.partition('=')
    if name in _SPEC_FLAGS and not eq:
      fields[_SPEC_FLAGS[name]] = True
    elif name in _SPEC_RATES and eq:
      try:
        fields[_SPEC_RATES[name]] = float(value)
      except ValueError:
        raise ValueError(f'noising {spec!r}: {name}={value!r} is not a number') from None
    else:
      known = [f'{n}=RATE' for n in _SPEC_RATES] + list(_SPEC_FLAGS)
      raise ValueError(f'noising {spec!r}: cannot read {item!r}; items are '
                       f'{", ".join(known)} (or none)')
  return BartNoising(**fields)
