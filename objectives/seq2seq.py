"""Teacher-forced cross-entropy for sequence-to-sequence models, with label smoothing.

Batches are data/seq2seq_data.py's: the model reads `inputs` and `decoder_inputs` (the
targets shifted right, BOS first) and predicts `targets`; every real target token counts
(`targets_segment_ids` ≠ 0), padding does not. With label smoothing ε (Szegedy et al. 2016;
0.1 in Vaswani et al. 2017) the target distribution is (1 − ε)·onehot(y) + ε/V, so

  loss_t = (1 − ε)·(−log p(y_t)) + ε · mean_v(−log p(v)).

The reported perplexity and accuracy are of the unsmoothed −log p(y_t) (`nll_sum`), the
model's own; `loss` is the smoothed one it is trained on.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from objectives import causal_lm

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Seq2Seq:
  """The recipe: label smoothing ε."""
  label_smoothing: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f'label_smoothing={self.label_smoothing} must lie in [0, 1)')


def apply_model(params: Any, batch: Batch, rng: jax.Array, *, model,
                deterministic: bool) -> jax.Array:
  """Teacher-forced logits `[B, T, V]` of a seq2seq model on a batch."""
  return model.apply(
      {'params': params}, batch['inputs'], batch['decoder_inputs'],
      inputs_segment_ids_BS=batch['inputs_segment_ids'],
      inputs_positions_BS=batch['inputs_positions'],
      targets_segment_ids_BT=batch['targets_segment_ids'],
      targets_positions_BT=batch['targets_positions'], deterministic=deterministic,
      rngs={'dropout': rng})


def smoothed_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                  label_smoothing: float) -> dict[str, jax.Array]:
  """Summed smoothed loss, unsmoothed NLL, correct predictions and weight.

  With log Z = logsumexp(logits), −log p(v) = log Z − logit_v, so the smoothed loss is
  log Z − (1 − ε)·logit_y − ε·mean_v logit_v: one pass of exponentials serves both terms.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT, max_BT = causal_lm.log_partition(logits_BTV)
  target_BT = causal_lm.target_logit(logits_BTV, targets_BT)
  nll_BT, correct_BT = log_z_BT - target_BT, target_BT >= max_BT
  loss_BT = nll_BT
  if label_smoothing:
    loss_BT = (log_z_BT - (1.0 - label_smoothing) * target_BT
               - label_smoothing * jnp.mean(logits_BTV, axis=-1))
  return {'loss_sum': jnp.sum(loss_BT * weights_BT), 'nll_sum': jnp.sum(nll_BT * weights_BT),
          'correct': jnp.sum(correct_BT * weights_BT), 'weight': jnp.sum(weights_BT)}


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: Seq2Seq = Seq2Seq()):
  """Mean smoothed cross-entropy over the real target tokens, and summed metrics."""
  logits_BTV = apply_model(params, batch, rng, model=model, deterministic=deterministic)
  weights_BT = (batch['targets_segment_ids'] != 0).astype(jnp.float32)
  sums = smoothed_sums(logits_BTV, batch['targets'], weights_BT, settings.label_smoothing)
  return sums['loss_sum'] / jnp.maximum(sums['weight'], 1.0), sums


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Smoothed loss; accuracy, NLL and perplexity of the unsmoothed predictions."""
  weight = max(float(sums['weight']), 1.0)
  nll = float(sums['nll_sum']) / weight
  return {'loss': float(sums['loss_sum']) / weight,
          'nll': nll,
          'accuracy': float(sums['correct']) / weight,
          'perplexity': float(jnp.exp(jnp.minimum(nll, 50.0))),
          'tokens': float(sums['weight'])}
