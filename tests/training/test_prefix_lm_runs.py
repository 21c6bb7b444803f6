"""The decoder-only prefix LM trained end to end: its loss scores the continuation alone
under the bidirectional-prefix mask (by hand, on a table 'model' and a tiny GPT), and
configs/prefix_lm.py trains, checkpoints and evaluates."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import prefix_lm as prefix_lm_config
from data import decoder_prefix_lm
from models import gpt
import objectives
from objectives import prefix_lm
from tests import tolerances
from training import loop

VOCAB = 20
# Two rows of 9 slots: [bos] 10 11 12 | 13 14 [eos] (P = 4) and [bos] 15 | 16 17 18 [eos].
ROWS = [([10, 11, 12], [13, 14, 3]), ([15], [16, 17, 18, 3])]


def _batch(rows=ROWS, seq_len=9):
  made = [decoder_prefix_lm.make_row(np.array(p), np.array(c), seq_len=seq_len, bos_id=2,
                                     pad_id=0) for p, c in rows]
  return {k: jnp.asarray(np.stack([m[k] for m in made])) for k in decoder_prefix_lm.FEATURES}


class _TableLM:
  """A 'model' whose logits are a fixed table whatever the tokens; records its arguments."""

  def __init__(self, logits_BTV):
    self.logits, self.calls = jnp.asarray(logits_BTV, jnp.float32), []

  def apply(self, variables, tokens, **kwargs):
    del variables, tokens
    self.calls.append(kwargs)
    return self.logits


def _hand_loss(logits_BTV, batch, spans):
  """Mean −log softmax(logits[b, t])[inputs[b, t + 1]] over the slots of `spans` (float64)."""
  logits = np.asarray(logits_BTV, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  inputs = np.asarray(batch['inputs'])
  terms = [-log_probs[b, t, inputs[b, t + 1]] for b, slots in enumerate(spans) for t in slots]
  return np.mean(terms), len(terms)


# The slots scored: from the prefix's last slot to the one before [eos].
SCORED = [range(3, 6), range(1, 5)]


def test_loss_is_the_continuations_by_hand():
  batch = _batch()
  model = _TableLM(np.random.default_rng(0).normal(size=(2, 9, VOCAB)) * 2)
  loss, metrics = prefix_lm.loss_fn({}, batch, jax.random.key(0), model=model)
  expected, count = _hand_loss(model.logits, batch, SCORED)
  tolerances.assert_close(float(loss), expected)
  assert float(metrics['weight']) == count == 7
  tolerances.assert_close(float(metrics['loss_sum']), expected * count)
  # The model reads each row's prefix length.
  np.testing.assert_array_equal(model.calls[0]['prefix_lengths_B'], [4, 2])


def test_only_the_continuations_targets_move_the_loss():
  batch = _batch()
  model = _TableLM(np.random.default_rng(1).normal(size=(2, 9, VOCAB)) * 2)
  loss = float(prefix_lm.loss_fn({}, batch, jax.random.key(0), model=model)[0])
  for b, (prefix, continuation) in enumerate(ROWS):
    length = 2 + len(prefix) + len(continuation) - 1  # [bos] prefix continuation([eos])
    for j in range(9):
      # The logits stay the table's: only the target of slot j - 1 changes.
      changed = dict(batch, inputs=batch['inputs'].at[b, j].set(19))
      moved = float(prefix_lm.loss_fn({}, changed, jax.random.key(0), model=model)[0]) != loss
      # Token j is a continuation token (or [eos]) iff P <= j < length.
      assert moved == (1 + len(prefix) <= j < length), (b, j)


def _tiny_gpt(mask='prefix_lm'):
  # Wide initial weights: attention far from uniform, so the masks' outputs differ clearly.
  cfg = gpt.GPTConfig(vocab_size=VOCAB, max_len=9, num_layers=2, num_heads=2, embed_dim=16,
                      mlp_dim=32, mask=mask, init_stddev=0.5)
  return gpt.GPT(cfg)


def test_a_gpt_is_trained_with_the_prefix_read_bidirectionally():
  model = _tiny_gpt()
  batch = _batch()
  params = jax.jit(model.init)(jax.random.key(0), batch['inputs'],
                               prefix_lengths_B=batch['prefix_lengths'])['params']
  loss, _ = jax.jit(lambda p, b: prefix_lm.loss_fn(p, b, jax.random.key(0), model=model,
                                                   deterministic=True))(params, batch)

  @jax.jit
  def logits_of(prefix_lengths_B):
    return model.apply({'params': params}, batch['inputs'], segment_ids_BT=batch['segment_ids'],
                       positions_BT=batch['positions'], prefix_lengths_B=prefix_lengths_B)

  expected, _ = _hand_loss(logits_of(batch['prefix_lengths']), batch, SCORED)
  tolerances.assert_close(float(loss), expected)
  # The test tells the masks apart: a causal mask (a prefix of one slot, [bos]), or a
  # prefix one slot short, gives a loss 100 times assert_close's tolerance away.
  for wrong in (jnp.ones_like(batch['prefix_lengths']), batch['prefix_lengths'] - 1):
    assert abs(_hand_loss(logits_of(wrong), batch, SCORED)[0] - expected) > 1e-3 * expected


def test_the_objective_names_the_features_it_needs():
  batch = {k: v for k, v in _batch().items() if k != 'prefix_lengths'}
  with pytest.raises(ValueError, match="prefix_lengths"):
    prefix_lm.loss_fn({}, batch, jax.random.key(0), model=_TableLM(np.zeros((2, 9, VOCAB))))
  assert objectives.build('prefix_lm').summarize is prefix_lm.summarize


def test_the_config_trains_checkpoints_and_evaluates(tmp_path, monkeypatch):
  # No window of shuffled rows to fill before the first batch: a faster start.
  monkeypatch.setattr(loop.pipeline, 'SHUFFLE_WINDOW_ROWS', 0)
  config = prefix_lm_config.get_config('size=tiny')
  assert config.model.mask == 'prefix_lm' and config.objective == 'prefix_lm'
  config.unlock()
  config.train.update(num_steps=3, eval_every=3, checkpoint_every=3, eval_batches=1,
                      log_every=1)
  config.lock()
  exp = loop.build(config)
  assert loop.is_decoder_prefix_lm(exp)
  # The training rows are prefix-LM rows, scored on their continuations.
  batch = next(loop.train_iterator(exp, loop.process_rows(exp)))
  assert set(batch) == set(decoder_prefix_lm.FEATURES)
  assert (batch['prefix_lengths'] >= 2).all() and batch['loss_weights'].sum() > 0
  np.testing.assert_array_equal(batch['inputs'][:, 0], exp.tokenizer.bos_id)

  workdir = str(tmp_path / 'run')
  report = loop.train_and_evaluate(config, workdir)
  assert np.isfinite(report['loss']) and report['tokens'] > 0
  valid = loop.eval_split(exp, 'validation')
  assert report['tokens'] == sum(b['loss_weights'].sum() for b in valid)
  # eval.py restores the checkpoint and gets the same validation loss.
  evaluator = importlib.import_module('eval').Evaluator(workdir)
  assert evaluator.mngr.latest_step() == 3
  results = evaluator.evaluate(3, ('validation',))
  tolerances.assert_close(results['validation']['loss'], report['loss'])
