"""Objectives by name. Each module has a pure `loss_fn(params, batch, rng, *, model,
deterministic) -> (loss, summed metrics)` and `summarize(summed metrics) -> report`."""

import types

from objectives import causal_lm

OBJECTIVES: dict[str, types.ModuleType] = {
    'causal_lm': causal_lm,
}


def get(name: str) -> types.ModuleType:
  try:
    return OBJECTIVES[name]
  except KeyError:
    raise ValueError(f'config.objective={name!r} is not one of {sorted(OBJECTIVES)}') from None
