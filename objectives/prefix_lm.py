"""The decoder-only prefix LM's loss (Raffel et al. 2020, sec. 3.2.1): the model reads each
row's prefix bidirectionally (`prefix_lengths_B`, mask='prefix_lm') and is scored on the
continuation alone.

Batches are rows of data/decoder_prefix_lm.py: `inputs`, `segment_ids`, `positions`
[B, T], `prefix_lengths` [B] and `loss_weights` [B, T], the weight of the prediction made
at slot t (of inputs[t+1]): 1 from the prefix's last slot to the one before [eos]. So

  loss = Σ_{b,t} w_bt · −log p(x_{b,t+1} | x_{b,<P_b}, x_{b,P_b..t}) / Σ w_bt,
  w_bt = loss_weights_bt · [seg_{b,t} = seg_{b,t+1} ≠ 0]   (causal_lm's weight).

Metrics are causal_lm's sums (`loss_sum`, `correct`, `weight`), counted over the
continuation's tokens; `summarize` is causal_lm's.
"""

from typing import Any

import jax
import jax.numpy as jnp

from objectives import causal_lm

Batch = dict[str, jax.Array]
FEATURES = ('prefix_lengths', 'loss_weights')
summarize = causal_lm.summarize


def targets_and_weights(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """The target of each slot and its weight, [B, T] each: causal_lm's, on the continuation."""
  targets_BT, weights_BT = causal_lm.next_token_targets(batch)
  return targets_BT, weights_BT * batch['loss_weights'].astype(jnp.float32)


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False):
  """Mean next-token cross-entropy over the continuation, and summed metrics."""
  missing = [k for k in FEATURES if k not in batch]
  if missing:
    raise ValueError(f"objective 'prefix_lm' needs the features {missing} of decoder-only "
                     "prefix-LM rows: config.data.task='prefix_lm' with a decoder-only model")
  logits_BTV = model.apply(
      {'params': params}, batch['inputs'],
      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
      prefix_lengths_B=batch['prefix_lengths'],
      deterministic=deterministic, rngs={'dropout': rng})
  targets_BT, weights_BT = targets_and_weights(batch)
  losses_BT, correct_BT = causal_lm.cross_entropy(logits_BTV, targets_BT)
  loss_sum = jnp.sum(losses_BT * weights_BT)
  weight = jnp.sum(weights_BT)
  correct = jnp.sum(correct_BT * weights_BT)
  metrics = {'loss_sum': loss_sum, 'correct': correct, 'weight': weight}
  return loss_sum / jnp.maximum(weight, 1.0), metrics
