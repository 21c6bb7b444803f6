"""BERT's token masking: on device from an RNG (dynamic) and in numpy per example (static).

Both versions share one recipe, `MaskedLM`, and one semantics:

1. Maskable tokens are real (segment id ≠ 0) and not special ([CLS], [SEP], [PAD], ...).
   Masks are never built from `tokens > 0`: RoBERTa pads with id 1.
2. Units: a token, or with `whole_word` a word — a maskable token that starts a word
   (`word_starts`) or follows a non-maskable one, with the maskable continuation tokens
   after it ("##ing"). A unit is selected or not as a whole.
3. Selection is an exact count per row with stochastic rounding: of the n units of a row,
   k = ⌊rate·n + u⌋ (u ~ U[0, 1)) are chosen uniformly without replacement.
4. Each selected token independently becomes [MASK] (`mask_fraction`), a random non-special
   token (`random_fraction`), or stays as it is (the rest). Like BERT's and Hugging Face's
   whole-word maskers, this 80/10/10 draw is per token, also inside a selected word.

Why an exact count rather than Bernoulli(rate) per token (Hugging Face's collator) or
round(rate·n) (BERT's create_pretraining_data): stochastic rounding keeps the expected
rate exactly `rate` for tokens and, because words are drawn uniformly, also for the tokens
of whole words, where round() is biased on short rows (it never masks a 3-token row at
15%). Against Bernoulli it cuts the per-row count's variance from n·p(1−p) to at most 1/4,
so the MLM loss weight of a row (and of a microbatch slice) barely varies — which also
keeps the MLM + NSP loss of a microbatched step close to the whole batch's. This is
fairseq's (RoBERTa's) rule. Counts are per row; packed rows are counted as one sequence.

The random replacement is drawn uniformly from the non-special ids (fairseq's choice): a
"random word" that is [MASK] or [PAD] would leak the corruption or pose as padding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskedLM:
  """The masking recipe: written down in the family's config, not left to defaults."""
  mask_id: int
  vocab_size: int
  special_ids: tuple[int, ...] = ()
  rate: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1
  whole_word: bool = False

  def __post_init__(self):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f'masking rate={self.rate} is not in [0, 1]')
    if min(self.mask_fraction, self.random_fraction) < 0 or (
        self.mask_fraction + self.random_fraction > 1.0):
      raise ValueError(f'mask_fraction={self.mask_fraction} + random_fraction='
                       f'{self.random_fraction} must be non-negative and at most 1')
    if not self.replacement_ids().size:
      raise ValueError(f'no non-special id below vocab_size={self.vocab_size} to sample from')

  def replacement_ids(self) -> np.ndarray:
    """The ids a 'random token' is drawn from: every non-special id of the vocabulary."""
    return np.setdiff1d(np.arange(self.vocab_size, dtype=np.int32),
                        np.asarray(self.special_ids, np.int32))


# ---------------------------------------------------------------------------------------
# On device (jax): dynamic masking from the step's RNG.


def maskable(inputs_BT: jax.Array, segment_ids_BT: jax.Array,
             special_ids: tuple[int, ...]) -> jax.Array:
  """Real, non-special tokens: [B, T] bool."""
  special_BT = jnp.isin(inputs_BT, jnp.asarray(special_ids, inputs_BT.dtype)) if special_ids \
      else jnp.zeros(inputs_BT.shape, bool)
  return (segment_ids_BT != 0) & ~special_BT


def unit_starts(maskable_BT: jax.Array, word_starts_BT: jax.Array | None,
                segment_ids_BT: jax.Array) -> jax.Array:
  """Where a unit (token, or whole word) starts: [B, T] bool.

  A maskable token starts a unit if it starts a word, or if the token before it is not
  maskable or lies in another segment (so a word never spans [SEP] or a document border).
  """
  if word_starts_BT is None:
    return maskable_BT
  pad = ((0, 0), (1, 0))
  prev_maskable_BT = jnp.pad(maskable_BT, pad)[:, :-1]
  prev_segment_BT = jnp.pad(segment_ids_BT, pad)[:, :-1]
  return maskable_BT & (word_starts_BT.astype(bool) | ~prev_maskable_BT
                        | (prev_segment_BT != segment_ids_BT))


def select(maskable_BT: jax.Array, starts_BT: jax.Array, rate: float, order_BT: jax.Array,
           rounding_B: jax.Array) -> jax.Array:
  """Which tokens are selected for prediction: [B, T] bool (see the module docstring).

  `order_BT` and `rounding_B` are U[0, 1) draws: the random order of the units, and the u
  of the stochastic rounding k = ⌊rate·n + u⌋.
  """
  batch, length = maskable_BT.shape
  units_B = jnp.sum(starts_BT, axis=-1)
  chosen_B = jnp.floor(rate * units_B.astype(jnp.float32) + rounding_B).astype(jnp.int32)
  # Unit starts in a random order (the rest sort last); the first k are chosen.
  rank_BT = jnp.argsort(jnp.argsort(jnp.where(starts_BT, order_BT, 2.0), axis=-1), axis=-1)
  chosen_start_BT = starts_BT & (rank_BT < chosen_B[:, None])
  # Each token takes the decision of the latest unit start at or before it.
  position_BT = jax.lax.broadcasted_iota(jnp.int32, (batch, length), 1)
  start_of_BT = jax.lax.cummax(jnp.where(starts_BT, position_BT, 0), axis=1)
  return maskable_BT & jnp.take_along_axis(chosen_start_BT, start_of_BT, axis=1)


def corrupt(inputs_BT: jax.Array, selected_BT: jax.Array, settings: MaskedLM,
            action_BT: jax.Array, pick_BT: jax.Array) -> jax.Array:
  """Selected tokens -> [MASK] / a random non-special token / unchanged.

  `action_BT` (U[0, 1)) picks among the three by the recipe's fractions; `pick_BT`
  (U[0, 1)) picks the random token among the non-special ids.
  """
  to_mask_BT = selected_BT & (action_BT < settings.mask_fraction)
  to_random_BT = selected_BT & ~to_mask_BT & (
      action_BT < settings.mask_fraction + settings.random_fraction)
  replacements = jnp.asarray(settings.replacement_ids(), inputs_BT.dtype)
  index_BT = jnp.minimum((pick_BT * len(replacements)).astype(jnp.int32), len(replacements) - 1)
  corrupted_BT = jnp.where(to_mask_BT, jnp.asarray(settings.mask_id, inputs_BT.dtype), inputs_BT)
  return jnp.where(to_random_BT, replacements[index_BT], corrupted_BT)


def mask_tokens(rng: jax.Array, inputs_BT: jax.Array, segment_ids_BT: jax.Array,
                settings: MaskedLM, word_starts_BT: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(corrupted inputs, targets, weights), [B, T] each: BERT masking drawn from `rng`.

  Targets are the original tokens where selected and 0 elsewhere; weights are 1.0 on the
  selected tokens (float32). `word_starts_BT` is required when `settings.whole_word`.
  """
  if settings.whole_word and word_starts_BT is None:
    raise ValueError('whole-word masking needs the batch feature word_starts')
  # One draw for everything: each separate jax.random call adds seconds of XLA:CPU compile.
  order_BT, action_BT, pick_BT, rounding_BT = jax.random.uniform(rng, (4, *inputs_BT.shape))
  maskable_BT = maskable(inputs_BT, segment_ids_BT, settings.special_ids)
  starts_BT = unit_starts(maskable_BT, word_starts_BT if settings.whole_word else None,
                          segment_ids_BT)
  selected_BT = select(maskable_BT, starts_BT, settings.rate, order_BT, rounding_BT[:, 0])
  corrupted_BT = corrupt(inputs_BT, selected_BT, settings, action_BT, pick_BT)
  targets_BT = jnp.where(selected_BT, inputs_BT, 0)
  return corrupted_BT, targets_BT, selected_BT.astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# In the pipeline (numpy): static masking, seeded per example (BERT's dupe_factor copies).


def maskable_np(tokens_T: np.ndarray, segment_ids_T: np.ndarray,
                special_ids: tuple[int, ...]) -> np.ndarray:
  """Real, non-special tokens of one example: [T] bool."""
  return (np.asarray(segment_ids_T) != 0) & ~np.isin(tokens_T, np.asarray(special_ids, int))


def unit_starts_np(maskable_T: np.ndarray, word_starts_T: np.ndarray | None,
                   segment_ids_T: np.ndarray | None = None) -> np.ndarray:
  """`unit_starts` for one example: [T] bool."""
  if word_starts_T is None:
    return maskable_T
  segments_T = np.zeros(len(maskable_T), int) if segment_ids_T is None else segment_ids_T
  prev_maskable_T = np.concatenate([[False], maskable_T[:-1]])
  prev_segment_T = np.concatenate([segments_T[:1], segments_T[:-1]])
  return maskable_T & (np.asarray(word_starts_T, bool) | ~prev_maskable_T
                       | (prev_segment_T != segments_T))


def mask_example(tokens_T: np.ndarray, maskable_T: np.ndarray,
                 word_starts_T: np.ndarray | None, seed, settings: MaskedLM,
                 segment_ids_T: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, weights) of one example, [T] each, with the semantics of `mask_tokens`.

  `seed` is anything `np.random.default_rng` takes, e.g. (run seed, example index, copy) so
  each of BERT's `dupe_factor` copies of an example gets its own fixed mask. Words never
  span a segment border when `segment_ids_T` is given.
  """
  tokens_T = np.asarray(tokens_T)
  maskable_T = np.asarray(maskable_T, bool)
  if settings.whole_word and word_starts_T is None:
    raise ValueError('whole-word masking needs word_starts')
  rng = np.random.default_rng(seed)
  starts_T = unit_starts_np(maskable_T, word_starts_T if settings.whole_word else None,
                            segment_ids_T)
  start_positions = np.flatnonzero(starts_T)
  chosen = int(np.floor(settings.rate * len(start_positions) + rng.random()))
  chosen_starts_T = np.zeros(len(tokens_T), bool)
  chosen_starts_T[rng.permutation(start_positions)[:chosen]] = True
  start_of_T = np.maximum.accumulate(np.where(starts_T, np.arange(len(tokens_T)), 0))
  selected_T = maskable_T & chosen_starts_T[start_of_T]

  action_T = rng.random(len(tokens_T))
  to_mask_T = selected_T & (action_T < settings.mask_fraction)
  to_random_T = selected_T & ~to_mask_T & (
      action_T < settings.mask_fraction + settings.random_fraction)
  replacements = settings.replacement_ids()
  inputs_T = np.where(to_mask_T, settings.mask_id, tokens_T)
  inputs_T = np.where(to_random_T, replacements[rng.integers(0, len(replacements),
                                                               len(tokens_T))], inputs_T)
  targets_T = np.where(selected_T, tokens_T, 0)
  return (inputs_T.astype(tokens_T.dtype), targets_T.astype(tokens_T.dtype),
          selected_T.astype(np.float32))
