"""Sequence classification (fine-tuning an encoder): cross-entropy on the head's logits.

The model returns {'logits': [B, C]}; the batch holds `label` [B] (int class). The loss is
the mean cross-entropy over real rows (eval batches are padded with empty rows).

The summed metrics include the confusion counts `confusion_<true>_<predicted>` (one scalar
each, so the trainer's host-side sums stay plain floats), from which `summarize` computes a
split's accuracy, F1 and Matthews correlation exactly, however many batches and hosts it
was spread over — a mean of per-batch F1 or MCC would not be the split's.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from objectives import causal_lm
from objectives import masked_lm
from objectives import next_sentence

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Classification:
  """num_classes of the head; positive_class is the class binary F1 scores (1 in GLUE)."""
  num_classes: int
  positive_class: int = 1


def predict(params: Any, batch: Batch, *, model) -> jax.Array:
  """The most likely class of each row: [B] int32 (deterministic, for host-side metrics)."""
  outputs = masked_lm.apply_encoder(params, batch, batch['inputs'], jax.random.key(0),
                                    model=model, deterministic=True)
  return jnp.argmax(outputs['logits'], axis=-1).astype(jnp.int32)


def confusion_sums(labels_B: jax.Array, predictions_B: jax.Array, rows_B: jax.Array,
                   num_classes: int) -> dict[str, jax.Array]:
  """{'confusion_i_j': number of real rows of class i predicted as j}."""
  classes = jnp.arange(num_classes)
  true_BC = (labels_B[:, None] == classes) * rows_B[:, None]
  predicted_BC = (predictions_B[:, None] == classes).astype(jnp.float32)
  counts_CC = jnp.einsum('bi,bj->ij', true_BC, predicted_BC)
  return {f'confusion_{i}_{j}': counts_CC[i, j]
          for i in range(num_classes) for j in range(num_classes)}


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: Classification):
  """Mean cross-entropy over real rows, and summed metrics (`weight` = rows)."""
  outputs = masked_lm.apply_encoder(params, batch, batch['inputs'], rng, model=model,
                                    deterministic=deterministic)
  logits_BC = outputs['logits']
  labels_B = batch['label'].astype(jnp.int32)
  rows_B = next_sentence.real_rows(batch)
  losses_B1, _ = causal_lm.cross_entropy(logits_BC[:, None, :], labels_B[:, None])
  predictions_B = jnp.argmax(logits_BC, axis=-1)
  sums = {'loss_sum': jnp.sum(losses_B1[:, 0] * rows_B),
          'correct': jnp.sum((predictions_B == labels_B) * rows_B),
          'weight': jnp.sum(rows_B),
          **confusion_sums(labels_B, predictions_B, rows_B, settings.num_classes)}
  return sums['loss_sum'] / jnp.maximum(sums['weight'], 1.0), sums


def confusion_matrix(sums: dict[str, float]) -> np.ndarray:
  """The [C, C] confusion counts (rows: true class, columns: predicted) from the sums."""
  num_classes = int(round(np.sqrt(sum(k.startswith('confusion_') for k in sums))))
  return np.array([[float(sums[f'confusion_{i}_{j}']) for j in range(num_classes)]
                   for i in range(num_classes)], np.float64)


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator / denominator) if denominator else 0.0


def f1_scores(confusion_CC: np.ndarray) -> np.ndarray:
  """Per-class F1 = 2·tp / (2·tp + fp + fn), 0 where a class is neither true nor predicted."""
  tp_C = np.diag(confusion_CC)
  fp_C = confusion_CC.sum(axis=0) - tp_C
  fn_C = confusion_CC.sum(axis=1) - tp_C
  return np.array([_ratio(2 * tp, 2 * tp + fp + fn) for tp, fp, fn in zip(tp_C, fp_C, fn_C)])


def macro_f1(confusion_CC: np.ndarray) -> float:
  """Mean F1 over the classes that occur as a label or a prediction (scikit-learn's default
  label set for average='macro')."""
  present_C = (confusion_CC.sum(axis=0) + confusion_CC.sum(axis=1)) > 0
  return float(f1_scores(confusion_CC)[present_C].mean()) if present_C.any() else 0.0


def matthews(confusion_CC: np.ndarray) -> float:
  """Matthews correlation (Gorodkin's multiclass form; the phi coefficient for 2 classes):

    (c·s − Σ_k p_k t_k) / √((s² − Σ_k p_k²)(s² − Σ_k t_k²)),

  c correct, s examples, p_k predicted as k, t_k truly k; 0 when a factor is 0.
  """
  correct, total = np.trace(confusion_CC), confusion_CC.sum()
  predicted_C, true_C = confusion_CC.sum(axis=0), confusion_CC.sum(axis=1)
  numerator = correct * total - predicted_C @ true_C
  denominator = np.sqrt((total ** 2 - predicted_C @ predicted_C) * (total ** 2 - true_C @ true_C))
  return _ratio(numerator, denominator)


def summarize(sums: dict[str, float], positive_class: int = 1) -> dict[str, float]:
  """loss, accuracy, f1 (of `positive_class`, binary tasks), macro_f1 and mcc of a split."""
  weight = max(float(sums['weight']), 1.0)
  confusion_CC = confusion_matrix(sums)
  report = {'loss': float(sums['loss_sum']) / weight,
            'accuracy': float(sums['correct']) / weight,
            'macro_f1': macro_f1(confusion_CC),
            'mcc': matthews(confusion_CC),
            'examples': float(sums['weight'])}
  if len(confusion_CC) == 2:
    report['f1'] = float(f1_scores(confusion_CC)[positive_class])
  return report
