"""Teacher-forced next-token prediction for decoder-only LMs.

Batches are packed rows: `inputs` [B, T] tokens, `segment_ids` [B, T] (0 = padding) and
`positions` [B, T]. Position t predicts token t+1 only when both lie in the same document, so
no loss crosses a document boundary or touches padding:

  loss = Σ_{b,t} w_bt · −log p(x_{b,t+1} | x_{b,≤t}) / Σ w_bt,
  w_bt = [seg_{b,t} = seg_{b,t+1} ≠ 0].

Metrics are returned as sums (`loss_sum`, `correct`, `weight`) so that averages over many
batches, hosts or devices are exact: see `summarize`.
"""

from typing import Any

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """The target of each position and its weight: [B, T-1] each."""
  segments = batch['segment_ids']
  targets = batch['inputs'][:, 1:]
  weights = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  return targets, weights.astype(jnp.float32)


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Cross-entropy per position, in float32."""
  log_probs = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets_BT[..., None], axis=-1)[..., 0]


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False):
  """Mean next-token cross-entropy over the weighted positions, and summed metrics."""
  logits = model.apply(
      {'params': params}, batch['inputs'],
      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
      deterministic=deterministic, rngs={'dropout': rng})
  logits = logits[:, :-1]
  targets, weights = next_token_targets(batch)
  losses = token_losses(logits, targets)
  loss_sum = jnp.sum(losses * weights)
  weight = jnp.sum(weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  metrics = {'loss_sum': loss_sum, 'correct': correct, 'weight': weight}
  return loss_sum / jnp.maximum(weight, 1.0), metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Turns summed metrics into loss, accuracy and perplexity."""
  weight = max(float(sums['weight']), 1.0)
  loss = float(sums['loss_sum']) / weight
  return {
      'loss': loss,
      'accuracy': float(sums['correct']) / weight,
      'perplexity': float(jnp.exp(jnp.minimum(loss, 50.0))),
      'tokens': float(sums['weight']),
  }
