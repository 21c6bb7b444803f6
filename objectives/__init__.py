"""Objectives by name. Each module has a pure `loss_fn(params, batch, rng, *, model,
deterministic) -> (loss, summed metrics)` and `summarize(summed metrics) -> report`.

Objectives with a recipe take it as the keyword `settings`, a frozen dataclass of their
module (masked_lm.MaskedLM, bert_pretraining.BertPretraining, classification.Classification,
...). `build` binds it from the config's `objective_settings` (the recipe, written down as
run), the tokenizer (special ids) and the task (number of classes). Every objective returns
a `weight` sum and the mean loss over it, so the trainer's microbatch accumulation weights
slices correctly."""

from collections.abc import Callable, Mapping
import dataclasses
import functools
import types
from typing import Any

from objectives import bert_pretraining
from objectives import causal_lm
from objectives import classification
from objectives import electra
from objectives import masked_lm
from objectives import next_sentence
from objectives import prefix_lm
from objectives import regression
from objectives import seq2seq
from objectives.masking import MaskedLM

OBJECTIVES: dict[str, types.ModuleType] = {
    'causal_lm': causal_lm,
    'prefix_lm': prefix_lm,  # decoder-only, scored on the continuation
    'masked_lm': masked_lm,
    'next_sentence': next_sentence,
    'bert_pretraining': bert_pretraining,
    'electra': electra,
    'classification': classification,
    'regression': regression,
    'seq2seq': seq2seq,
}


def get(name: str) -> types.ModuleType:
  try:
    return OBJECTIVES[name]
  except KeyError:
    raise ValueError(f'config.objective={name!r} is not one of {sorted(OBJECTIVES)}') from None


@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective with its recipe bound: what the trainer and eval.py call."""
  name: str
  loss_fn: Callable[..., Any]
  summarize: Callable[[dict[str, float]], dict[str, float]]
  settings: Any = None


def _masking(recipe: dict, tokenizer) -> MaskedLM:
  """BERT's masking recipe; the ids it needs come from the tokenizer."""
  fields = ('rate', 'mask_fraction', 'random_fraction', 'whole_word')
  return MaskedLM(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                  special_ids=tuple(int(i) for i in tokenizer.special_ids),
                  **{k: recipe.pop(k) for k in fields if k in recipe})


def _bert_pretraining(recipe: dict, tokenizer, num_classes) -> bert_pretraining.BertPretraining:
  del num_classes
  masking = _masking(recipe, tokenizer)
  return bert_pretraining.BertPretraining(masking, **{k: recipe.pop(k) for k in ('nsp_weight',)
                                                      if k in recipe})


def _electra(recipe: dict, tokenizer, num_classes) -> electra.Electra:
  del num_classes
  masking = _masking(recipe, tokenizer)
  return electra.Electra(masking, **{k: recipe.pop(k) for k in ('rtd_weight', 'temperature')
                                     if k in recipe})


# name: builder of its settings from (recipe, tokenizer, number of classes of the task).
_SETTINGS: dict[str, Callable[..., Any]] = {
    'masked_lm': lambda recipe, tokenizer, num_classes: _masking(recipe, tokenizer),
    'bert_pretraining': _bert_pretraining,
    'electra': _electra,
    'next_sentence': lambda recipe, tokenizer, num_classes: next_sentence.NextSentence(),
    'classification': lambda recipe, tokenizer, num_classes: classification.Classification(
        num_classes, **{k: recipe.pop(k) for k in ('positive_class',) if k in recipe}),
    'regression': lambda recipe, tokenizer, num_classes: regression.Regression(),
    'seq2seq': lambda recipe, tokenizer, num_classes: seq2seq.Seq2Seq(
        **{k: recipe.pop(k) for k in ('label_smoothing',) if k in recipe}),
}


def build(name: str, recipe: Mapping[str, Any] | None = None, *, tokenizer=None,
          num_classes: int | None = None) -> Objective:
  """The objective `name` with its settings bound.

  `recipe` is `config.objective_settings`: every key must be a setting of this objective
  (a typo fails here, naming the key).
  """
  module = get(name)
  recipe = dict(recipe or {})
  settings = None
  if name in _SETTINGS:
    if name in ('classification',) and not num_classes:
      raise ValueError(f'config.objective={name!r} needs a classification task (with classes); '
                       'use regression for a task with a real-valued label')
    settings = _SETTINGS[name](recipe, tokenizer, num_classes)
  if recipe:
    raise ValueError(f'config.objective_settings has keys {sorted(recipe)} that objective '
                     f'{name!r} does not take')
  loss_fn, summarize = module.loss_fn, module.summarize
  if settings is not None:
    loss_fn = functools.partial(loss_fn, settings=settings)
  if isinstance(settings, bert_pretraining.BertPretraining):
    summarize = functools.partial(summarize, nsp_weight=settings.nsp_weight)
  if isinstance(settings, electra.Electra):
    summarize = functools.partial(summarize, rtd_weight=settings.rtd_weight)
  if isinstance(settings, classification.Classification):
    summarize = functools.partial(summarize, positive_class=settings.positive_class)
  return Objective(name, loss_fn, summarize, settings)
