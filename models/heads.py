"""What an encoder's per-token states become per example: pooling over real tokens.

Pure functions of (hidden_BTD, segment_ids_BT) -> [B, D], picked by name (`POOLINGS`);
fine-tuning heads and feature extraction (studies/features.py) share them. Real tokens are
those with segment_ids != 0 (the tasks' convention: one example per row, 0 = padding);
they are never read off token ids (RoBERTa pads with id 1). Sums and means run in float32
and the result comes back in the hidden states' dtype.

Dims as in attention.py: B batch, T length, D model width.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def pool_cls(hidden_BTD: Array, segment_ids_BT: Array | None = None) -> Array:
  """The first token's state ([CLS] or <s>): position 0 of every row, before any pooler."""
  del segment_ids_BT  # position 0 is the first real token of every example
  return hidden_BTD[:, 0]


def pool_mean(hidden_BTD: Array, segment_ids_BT: Array) -> Array:
  """The mean over real tokens (segment_ids != 0); 0 for a row without any."""
  real_BT1 = (segment_ids_BT != 0)[..., None]
  # where, not a product with the mask: padding that holds inf or nan must not leak.
  total_BD = jnp.sum(jnp.where(real_BT1, hidden_BTD.astype(jnp.float32), 0.0), axis=1)
  count_B1 = jnp.maximum(jnp.sum(real_BT1, axis=1), 1).astype(jnp.float32)
  return (total_BD / count_B1).astype(hidden_BTD.dtype)


def pool_max(hidden_BTD: Array, segment_ids_BT: Array) -> Array:
  """The elementwise max over real tokens (segment_ids != 0); 0 for a row without any."""
  real_BT1 = (segment_ids_BT != 0)[..., None]
  max_BD = jnp.max(jnp.where(real_BT1, hidden_BTD, -jnp.inf), axis=1)
  return jnp.where(jnp.any(real_BT1, axis=1), max_BD, 0).astype(hidden_BTD.dtype)


POOLINGS = {'cls': pool_cls, 'mean': pool_mean, 'max': pool_max}


def pool(name: str, hidden_BTD: Array, segment_ids_BT: Array) -> Array:
  """POOLINGS[name](hidden_BTD, segment_ids_BT), with the known names in the error."""
  if name not in POOLINGS:
    raise ValueError(f'unknown pooling {name!r} (known: {", ".join(sorted(POOLINGS))})')
  return POOLINGS[name](hidden_BTD, segment_ids_BT)
