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
  """The target of each position and its weight: [B, T] each.

  The last position has no next token: its target is a weight-0 pad. Keeping the full
  length T means the loss never slices the [B, T, V] logits (whose gradient would then be
  a padded copy of them).
  """
  segments = batch['segment_ids']
  pad_last = ((0, 0), (0, 1))
  targets = jnp.pad(batch['inputs'][:, 1:], pad_last)
  next_segments = jnp.pad(segments[:, 1:], pad_last)
  weights = (next_segments == segments) & (next_segments != 0)
  return targets, weights.astype(jnp.float32)


def log_partition(logits_BTV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logsumexp over the vocabulary (float32 `[B, T]`), and the max that steadies it."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
  sum_exp_BT = jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1)
  return max_BT + jnp.log(sum_exp_BT), max_BT


def target_logit(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """logits[target] per position, picked by comparing the vocabulary index with the target
  rather than by a gather: the gradient is then one elementwise pass over the logits
  instead of a scatter into a [B, T, V] buffer of zeros."""
  vocab_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, 2)
  return jnp.sum(jnp.where(vocab_BTV == targets_BT[..., None], logits_BTV, 0.0), axis=-1)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """−log softmax(logits)[target] per position (float32), and whether the target is a
  most likely token (ties count as right).

      −log p(target) = logsumexp(logits) − logits[target]

  The max that steadies the logsumexp is the same max the accuracy compares against.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT, max_BT = log_partition(logits_BTV)
  target_logit_BT = target_logit(logits_BTV, targets_BT)
  return log_z_BT - target_logit_BT, target_logit_BT >= max_BT


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False):
  """Mean next-token cross-entropy over the weighted positions, and summed metrics."""
  logits_BTV = model.apply(
      {'params': params}, batch['inputs'],
      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
      deterministic=deterministic, rngs={'dropout': rng})
  targets_BT, weights_BT = next_token_targets(batch)
  losses_BT, correct_BT = cross_entropy(logits_BTV, targets_BT)
  loss_sum = jnp.sum(losses_BT * weights_BT)
  weight = jnp.sum(weights_BT)
  correct = jnp.sum(correct_BT * weights_BT)
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
