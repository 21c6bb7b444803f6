"""Objectives by name. Each module has a pure `loss_fn(params, batch, rng, *, model,
deterministic) -> (loss, summed metrics)` and `summarize(summed metrics) -> report`.

Objectives with a recipe take it as the keyword `settings`, a frozen dataclass of their
module (masked_lm.MaskedLM, bert_pretraining.BertPretraining, classification.Classification,
...), bound with functools.partial. Every objective returns a `weight` sum and the mean
loss over it, so the trainer's microbatch accumulation weights slices correctly."""

import types

from objectives import bert_pretraining
from objectives import causal_lm
from objectives import classification
from objectives import masked_lm
from objectives import next_sentence
from objectives import regression

OBJECTIVES: dict[str, types.ModuleType] = {
    'causal_lm': causal_lm,
    'masked_lm': masked_lm,
    'next_sentence': next_sentence,
    'bert_pretraining': bert_pretraining,
    'classification': classification,
    'regression': regression,
}


def get(name: str) -> types.ModuleType:
  try:
    return OBJECTIVES[name]
  except KeyError:
    raise ValueError(f'config.objective={name!r} is not one of {sorted(OBJECTIVES)}') from None
