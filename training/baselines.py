"""Reference points for language-model numbers: what a model that ignores context achieves."""

import collections
import math

import numpy as np

from objectives import causal_lm


def _targets(batches):
  """The (token, weight > 0) targets a causal LM is scored on, as one flat array."""
  out = []
  for batch in batches:
    targets, weights = causal_lm.next_token_targets(
        {k: np.asarray(v) for k, v in batch.items()})
    out.append(np.asarray(targets)[np.asarray(weights) > 0])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def unigram_perplexity(train_batches, eval_batches, vocab_size: int) -> float:
  """Perplexity on the eval targets of add-one-smoothed training-target frequencies."""
  counts = collections.Counter(_targets(train_batches).tolist())
  total = sum(counts.values()) + vocab_size
  nll = [-math.log((counts.get(t, 0) + 1) / total) for t in _targets(eval_batches).tolist()]
  return math.exp(sum(nll) / max(len(nll), 1))
