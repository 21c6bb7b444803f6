"""Position encodings, picked by name (`GPTConfig.position`).

An entry of POSITIONS is a Flax module class built as
`cls(max_len=..., features=..., dtype=..., param_dtype=..., name=...)` and called on
explicit positions `[B, T]`; it returns `[B, T, D]` that the model adds to the token
embeddings. Positions are explicit because packed sequences restart them at every document
and decoding takes them from the cache. Encodings that act inside attention rather than on
the input (relative positions, RoPE, ALiBi) register a sibling entry and an attention score
or bias; this file keeps the additive, absolute kind.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


class LearnedPositions(nn.Module):
  """A learned table of absolute position embeddings `[max_len, D]` (GPT-2, BERT).

  Attributes:
    max_len: number of positions; positions must lie in [0, max_len).
    features: D.
    dtype: dtype of the returned embeddings.
    param_dtype: storage dtype of the table.
    stddev: standard deviation of the normal initializer.
  """
  max_len: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  stddev: float = 0.02

  @nn.compact
  def __call__(self, positions_BT: Array) -> Array:
    table_LD = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(self.stddev), ('length', 'embed')),
        (self.max_len, self.features), self.param_dtype)
    x_BTD = jnp.take(table_LD, positions_BT, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))


POSITIONS: dict[str, type[nn.Module]] = {'learned': LearnedPositions}


def register(name: str, cls: type[nn.Module]) -> None:
  """Makes `cls` selectable as `position=name`."""
  POSITIONS[name] = cls


def get(name: str) -> type[nn.Module]:
  if name not in POSITIONS:
    raise ValueError(f'unknown position encoding {name!r} (known: {", ".join(sorted(POSITIONS))})')
  return POSITIONS[name]
