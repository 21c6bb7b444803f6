"""ELECTRA's replacement sampling over a vocabulary of several search groups."""

import jax
import jax.numpy as jnp
import numpy as np

from objectives import electra


def test_samples_follow_the_softmax_across_groups_and_skip_zero_probabilities():
  """300 tokens: three groups of `_GROUP` = 128, the last padded. Mass in every group, and
  zero-probability tokens at the ends of groups, where a search off by one would land."""
  vocab = 300
  assert vocab > 2 * electra._GROUP  # pylint: disable=protected-access
  probabilities = np.full(vocab, 1.0)
  probabilities[[5, 127, 128, 255, 256, 299]] = 0.0
  probabilities[[0, 130, 290]] = [200.0, 150.0, 100.0]
  probabilities /= probabilities.sum()
  draws = 40000
  logits_BTV = jnp.broadcast_to(jnp.log(jnp.asarray(probabilities, jnp.float32)),
                                (1, draws, vocab))
  originals_BT = jnp.full((1, draws), vocab - 1, jnp.int32)
  sampled_BT, _ = jax.jit(electra.replace_tokens, static_argnums=4)(
      jax.random.key(2), logits_BTV, originals_BT, jnp.ones((1, draws), bool), 1.0)
  frequencies = np.bincount(np.asarray(sampled_BT[0]), minlength=vocab) / draws
  assert frequencies[probabilities == 0].sum() == 0.0
  # Per group, and the three heavy tokens: 5 standard errors of a binomial proportion.
  groups = np.arange(vocab) // electra._GROUP  # pylint: disable=protected-access
  expected = np.concatenate([np.bincount(groups, probabilities), probabilities[[0, 130, 290]]])
  observed = np.concatenate([np.bincount(groups, frequencies), frequencies[[0, 130, 290]]])
  error = 5 * np.sqrt(expected * (1 - expected) / draws)
  assert np.all(np.abs(observed - expected) < error), (observed, expected)
