"""Next-sentence prediction (BERT): is segment B the sentence that follows A?

The model's NSP head scores the pooled [CLS] output with two logits; index 0 means "B is
the next sentence" and index 1 "B is a random sentence", as in Google's BERT and Hugging
Face, so imported heads line up. The loss is the 2-way softmax cross-entropy, which is the
binary cross-entropy of σ(z₁ − z₀) against `nsp_label`:

  loss = Σ_b r_b · −log softmax(nsp_logits_b)[nsp_label_b] / Σ_b r_b,

with r_b = 1 for a row holding any real token (eval batches are padded with empty rows,
marked `example_weight` 0).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from objectives import causal_lm
from objectives import masked_lm

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class NextSentence:
  """NSP has no recipe of its own; the class keeps the `settings` keyword uniform."""


def real_rows(batch: Batch) -> jax.Array:
  """1.0 for rows with any real token, 0.0 for padding rows: [B] float32.

  The encoder pipeline also marks the rows that pad the last eval batch with
  `example_weight` 0; where present it counts too.
  """
  rows_B = jnp.any(batch['segment_ids'] != 0, axis=-1).astype(jnp.float32)
  if 'example_weight' in batch:
    rows_B = rows_B * batch['example_weight'].astype(jnp.float32)
  return rows_B


def nsp_sums(nsp_logits_B2: jax.Array, labels_B: jax.Array,
             rows_B: jax.Array) -> dict[str, jax.Array]:
  """Summed NSP metrics: loss, correct predictions and scored rows."""
  losses_B1, _ = causal_lm.cross_entropy(nsp_logits_B2[:, None, :], labels_B[:, None])
  # An explicit argmax (first index on ties), so a tie is not counted right twice.
  correct_B = jnp.argmax(nsp_logits_B2, axis=-1) == labels_B
  return {'nsp_loss_sum': jnp.sum(losses_B1[:, 0] * rows_B),
          'nsp_correct': jnp.sum(correct_B * rows_B),
          'nsp_weight': jnp.sum(rows_B)}


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: NextSentence = NextSentence()):
  """Mean NSP cross-entropy over real rows, and summed metrics (`weight` = rows)."""
  del settings
  outputs = masked_lm.apply_encoder(params, batch, batch['inputs'], rng, model=model,
                                    deterministic=deterministic)
  sums = nsp_sums(outputs['nsp_logits'], batch['nsp_label'], real_rows(batch))
  sums['weight'] = sums['nsp_weight']
  return sums['nsp_loss_sum'] / jnp.maximum(sums['weight'], 1.0), sums


def nsp_report(sums: dict[str, float]) -> dict[str, float]:
  weight = max(float(sums['nsp_weight']), 1.0)
  return {'nsp_loss': float(sums['nsp_loss_sum']) / weight,
          'nsp_accuracy': float(sums['nsp_correct']) / weight,
          'nsp_examples': float(sums['nsp_weight'])}


def summarize(sums: dict[str, float]) -> dict[str, float]:
  report = nsp_report(sums)
  return {'loss': report['nsp_loss'], **report}
