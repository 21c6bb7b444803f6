"""Sequence regression (fine-tuning an encoder, e.g. STS-B): mean squared error.

The model returns {'logits': [B, 1] or [B]}; the batch holds a float `label` [B]. The
summed metrics are the moments Pearson's r needs — n, Σx, Σy, Σx², Σy², Σxy (x the
prediction, y the label) — so a split's correlation is exact from sums over any number of
batches and hosts:

  r = (nΣxy − ΣxΣy) / √((nΣx² − (Σx)²)(nΣy² − (Σy)²)).

Each batch sums in float32 and the host adds batches in float64; on labels of a few units
(STS-B's 0-5) that cancellation costs nothing visible. Spearman's ρ ranks all examples, so
no sums give it: collect per-example predictions (`predict`) and call `spearman`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from objectives import masked_lm
from objectives import next_sentence

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Regression:
  """Regression has no recipe of its own; the class keeps the `settings` keyword uniform."""


def _scores(outputs: dict[str, jax.Array]) -> jax.Array:
  logits = outputs['logits'].astype(jnp.float32)
  return logits[:, 0] if logits.ndim == 2 else logits


def predict(params: Any, batch: Batch, *, model) -> jax.Array:
  """The predicted value of each row: [B] float32 (deterministic, for host-side metrics)."""
  return _scores(masked_lm.apply_encoder(params, batch, batch['inputs'], jax.random.key(0),
                                         model=model, deterministic=True))


def moment_sums(x_B: jax.Array, y_B: jax.Array, rows_B: jax.Array) -> dict[str, jax.Array]:
  """n, Σx, Σy, Σx², Σy², Σxy over real rows."""
  return {'weight': jnp.sum(rows_B),
          'sum_x': jnp.sum(x_B * rows_B), 'sum_y': jnp.sum(y_B * rows_B),
          'sum_xx': jnp.sum(x_B * x_B * rows_B), 'sum_yy': jnp.sum(y_B * y_B * rows_B),
          'sum_xy': jnp.sum(x_B * y_B * rows_B)}


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: Regression = Regression()):
  """Mean squared error over real rows, and summed metrics (`weight` = rows)."""
  del settings
  x_B = _scores(masked_lm.apply_encoder(params, batch, batch['inputs'], rng, model=model,
                                        deterministic=deterministic))
  y_B = batch['label'].astype(jnp.float32)
  rows_B = next_sentence.real_rows(batch)
  sums = {'loss_sum': jnp.sum((x_B - y_B) ** 2 * rows_B), **moment_sums(x_B, y_B, rows_B)}
  return sums['loss_sum'] / jnp.maximum(sums['weight'], 1.0), sums


def pearson(sums: dict[str, float]) -> float:
  """Pearson's r from the moment sums; 0 when either side is constant."""
  n, sx, sy = (float(sums[k]) for k in ('weight', 'sum_x', 'sum_y'))
  sxx, syy, sxy = (float(sums[k]) for k in ('sum_xx', 'sum_yy', 'sum_xy'))
  variance = (n * sxx - sx * sx) * (n * syy - sy * sy)
  return (n * sxy - sx * sy) / np.sqrt(variance) if variance > 0 else 0.0


def spearman(predictions, labels) -> float:
  """Spearman's ρ of per-example predictions and labels (host-side, scipy).

  It needs every prediction of the split — ranks do not decompose into sums — so gather
  `predict` outputs over all batches (and hosts) first.
  """
  import scipy.stats  # pylint: disable=g-import-not-at-top  (only hosts that report need it)
  predictions, labels = np.asarray(predictions, np.float64), np.asarray(labels, np.float64)
  if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
    return 0.0
  return float(scipy.stats.spearmanr(predictions, labels).statistic)


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """loss (mean squared error) and pearson of a split."""
  weight = max(float(sums['weight']), 1.0)
  return {'loss': float(sums['loss_sum']) / weight, 'pearson': float(pearson(sums)),
          'examples': float(sums['weight'])}
