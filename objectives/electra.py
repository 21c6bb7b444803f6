"""ELECTRA pretraining (Clark et al. 2020): MLM for the generator, replaced-token detection
(RTD) for the discriminator, trained jointly.

    x̃   = mask(x)                                    ~15% of tokens; 85% [MASK] / 15% kept
    L_G = mean_{t masked} −log p_G(x_t | x̃)
    x̂_t ~ softmax(G's logits_t / τ) at masked t, x_t elsewhere    (no gradient)
    y_t = [x̂_t ≠ x_t]                                a sample equal to x_t counts as original
    L_D = mean_{t real} BCE(σ(D(x̂)_t), y_t)          every real token, [CLS] and [SEP] too
    loss = L_G + λ · L_D,   λ = 50

The masking recipe is its own setting (ELECTRA: mask_fraction 0.85, random_fraction 0;
BERT's 80/10/10 is another config). Masks are dynamic (from the step's RNG) or the
pipeline's static ones, as in `objectives.masked_lm`. Samples are drawn from the whole
vocabulary, as Google's code does, by inverse CDF (`replace_tokens`) rather than its
Gumbel-max: the same distribution from one random number per position instead of V.

Microbatches: `weight` is the number of real tokens, so the RTD mean is exact over slices;
the MLM mean is the token-weighted mean of the slices' means (exact when slices hold equal
masked fractions, which the exact per-row count keeps nearly so).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from objectives import masked_lm
from objectives.masking import MaskedLM

Batch = dict[str, jax.Array]

# Streams of the step's RNG beyond masked_lm's (masking 0, dropout 1).
_SAMPLE_STREAM, _DISCRIMINATOR_DROPOUT_STREAM = 2, 3
# Tokens per group of `replace_tokens`' two-level search of the cumulative probabilities.
_GROUP = 128


@dataclasses.dataclass(frozen=True)
class Electra:
  """The recipe: masking, the RTD loss weight λ, and the sampling temperature τ."""
  masking: MaskedLM
  rtd_weight: float = 50.0
  temperature: float = 1.0

  def __post_init__(self):
    if not self.rtd_weight >= 0:
      raise ValueError(f'rtd_weight={self.rtd_weight} must be non-negative')
    if not self.temperature > 0:
      raise ValueError(f'temperature={self.temperature} must be positive')


def replace_tokens(rng: jax.Array, logits_BTV: jax.Array, originals_BT: jax.Array,
                   selected_BT: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """(the discriminator's inputs x̂, labels y = [x̂ ≠ x]): generator samples at the selected
  positions (softmax of logits / τ, no gradient), the original tokens elsewhere.

  A sample is the first token whose cumulative probability exceeds a uniform u: one random
  number per position. Gumbel-max (`jax.random.categorical`) draws V of them, and on
  XLA:CPU generating those B·T·V numbers took a third of bench/electra_speed.py's train
  step (docs/benchmarks.md). The search runs over groups of `_GROUP` tokens, then within
  the group found: a V-long cumulative sum was the slowest pass left. Float32 resolves
  probabilities down to ~1e-7 of the total.

  Dims: G groups of C = `_GROUP` tokens (the vocabulary padded with zero weights).
  """
  batch, length, vocab = logits_BTV.shape
  groups = -(-vocab // _GROUP)
  logits_BTV = jax.lax.stop_gradient(logits_BTV) / temperature
  # Unnormalised weights: the total is scaled by u instead.
  weights_BTV = jnp.exp(logits_BTV - jnp.max(logits_BTV, axis=-1, keepdims=True))
  weights_BTGC = jnp.pad(weights_BTV, ((0, 0), (0, 0), (0, groups * _GROUP - vocab))).reshape(
      batch, length, groups, _GROUP)
  group_weights_BTG = jnp.sum(weights_BTGC, axis=-1)
  ends_BTG = jnp.cumsum(group_weights_BTG, axis=-1)
  target_BT = jax.random.uniform(rng, (batch, length)) * ends_BTG[..., -1]
  # The first group ending above the target, then the first token in it whose cumulative
  # weight does: a token of zero weight never is. The clips only catch float rounding at a
  # group's end, which can land on its last token.
  group_BT = jnp.minimum(jnp.sum(ends_BTG <= target_BT[..., None], axis=-1), groups - 1)
  take_group = lambda x, axis: jnp.take_along_axis(
      x, group_BT.reshape(group_BT.shape + (1,) * (x.ndim - 2)), axis=axis).squeeze(axis)
  before_BT = take_group(ends_BTG - group_weights_BTG, 2)
  within_BTC = jnp.cumsum(take_group(weights_BTGC, 2), axis=-1)
  offset_BT = jnp.minimum(jnp.sum(within_BTC <= (target_BT - before_BT)[..., None], axis=-1),
                          _GROUP - 1)
  sampled_BT = jnp.minimum(group_BT * _GROUP + offset_BT, vocab - 1).astype(originals_BT.dtype)
  replaced_inputs_BT = jnp.where(selected_BT, sampled_BT, originals_BT)
  return replaced_inputs_BT, replaced_inputs_BT != originals_BT


def rtd_sums(logits_BT: jax.Array, labels_BT: jax.Array,
             weights_BT: jax.Array) -> dict[str, jax.Array]:
  """Summed RTD metrics: loss, correct, scored tokens, and the counts behind precision and
  recall of "replaced"."""
  labels_BT = labels_BT.astype(jnp.float32)
  losses_BT = optax.sigmoid_binary_cross_entropy(logits_BT, labels_BT)
  predicted_BT = (logits_BT > 0).astype(jnp.float32)
  return {'rtd_loss_sum': jnp.sum(losses_BT * weights_BT),
          'rtd_correct': jnp.sum((predicted_BT == labels_BT) * weights_BT),
          'rtd_weight': jnp.sum(weights_BT),
          'rtd_replaced': jnp.sum(labels_BT * weights_BT),
          'rtd_predicted': jnp.sum(predicted_BT * weights_BT),
          'rtd_true_positive': jnp.sum(predicted_BT * labels_BT * weights_BT)}


def prediction_slots(settings: MaskedLM, length: int, static: bool) -> int:
  """M: how many slots per row can be selected, so the generator's head runs at M < T.

  Dynamic token masking selects k = ⌊rate·n + u⌋ ≤ ⌊rate·T⌋ + 1 of a row's n ≤ T tokens
  (objectives/masking.py). Whole words, and the pipeline's static masks (counted per
  packed example, not per row), have no such bound: every slot.
  """
  if static or settings.whole_word:
    return length
  return min(length, int(settings.rate * length) + 1)


def gather_slots(weights_BT: jax.Array, count: int) -> tuple[jax.Array, Any]:
  """(slots_BM, take): the selected slots of each row first (in slot order, then unselected
  ones to fill M = `count`), and a function taking a [B, T] array at them."""
  # top_k is stable: equal weights keep slot order, so the selected come first in order.
  _, slots_BM = jax.lax.top_k(weights_BT, count)
  return slots_BM, lambda x_BT: jnp.take_along_axis(x_BT, slots_BM, axis=1)


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: Electra):
  """L_G + λ·L_D from a generator and a discriminator pass, and summed metrics.

  The generator's MLM head (and so the sampling) runs at the M slots that can be selected
  (`prediction_slots`), not at all T: the same losses, M/T of the head's FLOPs.
  """
  inputs_BT, targets_BT, weights_BT = masked_lm.masked_inputs(batch, rng, settings.masking)
  selected_BT = weights_BT > 0
  originals_BT = jnp.where(selected_BT, targets_BT, inputs_BT)
  features = dict(token_types_BT=batch.get('token_types'), segment_ids_BT=batch['segment_ids'],
                  positions_BT=batch['positions'], deterministic=deterministic)
  variables = {'params': params}

  slots_BM, take = gather_slots(weights_BT, prediction_slots(
      settings.masking, inputs_BT.shape[1], static='mlm_targets' in batch))
  generated = model.apply(variables, inputs_BT, **features, mlm_at_BM=slots_BM,
                          method='generate', rngs={'dropout': masked_lm.dropout_rng(rng)})
  sums = masked_lm.mlm_sums(generated['mlm_logits'], take(targets_BT), take(weights_BT))

  # Samples at the gathered slots, written back into the rows.
  sampled_BM, _ = replace_tokens(
      jax.random.fold_in(rng, _SAMPLE_STREAM), generated['mlm_logits'], take(originals_BT),
      take(selected_BT), settings.temperature)
  rows_B1 = jnp.arange(slots_BM.shape[0])[:, None]
  replaced_inputs_BT = originals_BT.at[rows_B1, slots_BM].set(sampled_BM)
  labels_BT = replaced_inputs_BT != originals_BT
  discriminated = model.apply(
      variables, replaced_inputs_BT, **features, method='discriminate',
      rngs={'dropout': jax.random.fold_in(rng, _DISCRIMINATOR_DROPOUT_STREAM)})
  real_BT = (batch['segment_ids'] != 0).astype(jnp.float32)
  sums.update(rtd_sums(discriminated['rtd_logits'], labels_BT, real_BT))
  sums['weight'] = sums['rtd_weight']

  mlm_loss = sums['mlm_loss_sum'] / jnp.maximum(sums['mlm_weight'], 1.0)
  rtd_loss = sums['rtd_loss_sum'] / jnp.maximum(sums['rtd_weight'], 1.0)
  return mlm_loss + settings.rtd_weight * rtd_loss, sums


def rtd_report(sums: dict[str, float]) -> dict[str, float]:
  """RTD loss, accuracy, and precision/recall of "replaced"; the replaced fraction."""
  weight = max(float(sums['rtd_weight']), 1.0)
  true_positive = float(sums['rtd_true_positive'])
  return {'rtd_loss': float(sums['rtd_loss_sum']) / weight,
          'rtd_accuracy': float(sums['rtd_correct']) / weight,
          'rtd_precision': true_positive / max(float(sums['rtd_predicted']), 1.0),
          'rtd_recall': true_positive / max(float(sums['rtd_replaced']), 1.0),
          'replaced_fraction': float(sums['rtd_replaced']) / weight}


def summarize(sums: dict[str, float], rtd_weight: float = 50.0) -> dict[str, float]:
  """The generator's MLM report, the discriminator's RTD report, and `loss` = L_G + λ·L_D."""
  report = {**masked_lm.mlm_report(sums), **rtd_report(sums)}
  return {'loss': report['mlm_loss'] + rtd_weight * report['rtd_loss'], **report}
