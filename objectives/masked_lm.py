"""Masked language modelling (BERT, RoBERTa): predict the selected tokens from the rest.

  loss = Σ_{b,t} w_bt · −log p(x_bt | x̃_b) / Σ w_bt,   w_bt = [token (b, t) was selected]

where x̃ is the corrupted row (see `objectives.masking`). Masks are either

- dynamic: drawn on device from the step's RNG, so a sentence gets a new mask every time
  it is seen (RoBERTa). Microbatch slices get different RNGs from the trainer
  (`fold_in(rng, slice)`), so they draw different masks; or
- static: the batch already holds `mlm_targets` and `mlm_weights` and corrupted `inputs`
  from the pipeline (BERT's masks fixed per example, `dupe_factor` copies); then this
  objective does not mask.

Which one is decided by the batch's features. Metrics are sums (`mlm_loss_sum`,
`mlm_correct`, `weight` = selected tokens) so averages over batches and hosts are exact.
"""

from typing import Any

import jax
import jax.numpy as jnp

from objectives import causal_lm
from objectives import masking
from objectives.masking import MaskedLM  # the recipe, re-exported: masked_lm.MaskedLM

__all__ = ['MaskedLM', 'apply_encoder', 'dropout_rng', 'masked_inputs', 'mlm_sums', 'mlm_report',
           'loss_fn', 'summarize']

Batch = dict[str, jax.Array]

# Streams derived from the step's RNG: masking and dropout must not share random bits.
_MASK_STREAM, _DROPOUT_STREAM = 0, 1


def dropout_rng(rng: jax.Array) -> jax.Array:
  """The dropout stream of the step's RNG (the masking stream is separate)."""
  return jax.random.fold_in(rng, _DROPOUT_STREAM)


def apply_encoder(params: Any, batch: Batch, inputs_BT: jax.Array, rng: jax.Array, *, model,
                  deterministic: bool) -> dict[str, jax.Array]:
  """One forward pass of an encoder on `inputs_BT` with the batch's other features."""
  return model.apply(
      {'params': params}, inputs_BT, token_types_BT=batch.get('token_types'),
      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
      deterministic=deterministic, rngs={'dropout': rng})


def masked_inputs(batch: Batch, rng: jax.Array, settings: MaskedLM
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(inputs, targets, weights): the pipeline's static masks, or fresh ones from `rng`."""
  if 'mlm_targets' in batch:
    return (batch['inputs'], batch['mlm_targets'],
            batch['mlm_weights'].astype(jnp.float32))
  word_starts_BT = batch.get('word_starts') if settings.whole_word else None
  return masking.mask_tokens(jax.random.fold_in(rng, _MASK_STREAM), batch['inputs'],
                             batch['segment_ids'], settings, word_starts_BT)


def mlm_sums(logits_BTV: jax.Array, targets_BT: jax.Array,
             weights_BT: jax.Array) -> dict[str, jax.Array]:
  """Summed MLM metrics: loss, correct predictions and scored tokens."""
  losses_BT, correct_BT = causal_lm.cross_entropy(logits_BTV, targets_BT)
  return {'mlm_loss_sum': jnp.sum(losses_BT * weights_BT),
          'mlm_correct': jnp.sum(correct_BT * weights_BT),
          'mlm_weight': jnp.sum(weights_BT)}


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: MaskedLM):
  """Mean cross-entropy over the selected tokens, and summed metrics."""
  inputs_BT, targets_BT, weights_BT = masked_inputs(batch, rng, settings)
  outputs = apply_encoder(params, batch, inputs_BT, dropout_rng(rng), model=model,
                          deterministic=deterministic)
  sums = mlm_sums(outputs['mlm_logits'], targets_BT, weights_BT)
  sums['weight'] = sums['mlm_weight']
  return sums['mlm_loss_sum'] / jnp.maximum(sums['weight'], 1.0), sums


def mlm_report(sums: dict[str, float]) -> dict[str, float]:
  """MLM loss, accuracy and perplexity from summed metrics."""
  weight = max(float(sums['mlm_weight']), 1.0)
  loss = float(sums['mlm_loss_sum']) / weight
  return {'mlm_loss': loss,
          'mlm_accuracy': float(sums['mlm_correct']) / weight,
          'mlm_perplexity': float(jnp.exp(jnp.minimum(loss, 50.0))),
          'mlm_tokens': float(sums['mlm_weight'])}


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """The MLM report; `loss` is the MLM loss (the quantity trained)."""
  report = mlm_report(sums)
  return {'loss': report['mlm_loss'], **report}
