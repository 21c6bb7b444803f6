"""BERT pretraining: masked LM + next-sentence prediction in one forward pass.

  loss = mean MLM cross-entropy over selected tokens + nsp_weight · mean NSP cross-entropy

as in Google's BERT (`run_pretraining.py` adds the two means). The batch holds sentence
pairs `[CLS] A [SEP] B [SEP]` with `nsp_label`; masking is dynamic (from the step's RNG)
or static (the pipeline's `mlm_targets`/`mlm_weights`), as in `objectives.masked_lm`.
RoBERTa drops NSP and trains `masked_lm` alone.

Microbatches: the trainer weights each slice's loss by `weight`, here the number of real
rows (pairs). The NSP term is then exactly the whole batch's mean; the MLM term is the
row-weighted mean of the slices' token means, which equals the whole batch's token mean
when slices hold equally many selected tokens per row — nearly so, since masking picks an
exact count per row (±1, see `objectives.masking`). A sum of two means has no single
weight that makes both exact. The reported metrics are exact: they are kept as separate
sums.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from objectives import masked_lm
from objectives import next_sentence
from objectives.masking import MaskedLM

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BertPretraining:
  """The MLM masking recipe and the weight of the NSP term (1.0 in BERT)."""
  masking: MaskedLM
  nsp_weight: float = 1.0


def loss_fn(params: Any, batch: Batch, rng: jax.Array, *, model, deterministic: bool = False,
            settings: BertPretraining):
  """MLM mean + nsp_weight · NSP mean from one forward pass, and summed metrics."""
  inputs_BT, targets_BT, weights_BT = masked_lm.masked_inputs(batch, rng, settings.masking)
  outputs = masked_lm.apply_encoder(
      params, batch, inputs_BT, masked_lm.dropout_rng(rng), model=model,
      deterministic=deterministic)
  sums = masked_lm.mlm_sums(outputs['mlm_logits'], targets_BT, weights_BT)
  sums.update(next_sentence.nsp_sums(outputs['nsp_logits'], batch['nsp_label'],
                                     next_sentence.real_rows(batch)))
  sums['weight'] = sums['nsp_weight']
  mlm_loss = sums['mlm_loss_sum'] / jnp.maximum(sums['mlm_weight'], 1.0)
  nsp_loss = sums['nsp_loss_sum'] / jnp.maximum(sums['nsp_weight'], 1.0)
  return mlm_loss + settings.nsp_weight * nsp_loss, sums


def summarize(sums: dict[str, float], nsp_weight: float = 1.0) -> dict[str, float]:
  """mlm_loss/accuracy/perplexity, nsp_loss/accuracy, and `loss` = their weighted sum."""
  report = {**masked_lm.mlm_report(sums), **next_sentence.nsp_report(sums)}
  return {'loss': report['mlm_loss'] + nsp_weight * report['nsp_loss'], **report}
