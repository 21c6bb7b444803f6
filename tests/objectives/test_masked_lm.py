"""MLM, NSP and BERT pretraining losses against hand computations on toy batches."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import objectives
from objectives import bert_pretraining
from objectives import masked_lm
from objectives import masking
from objectives import next_sentence
from training import step as step_lib

CLS, SEP, MASK = 1, 2, 3
SETTINGS = masked_lm.MaskedLM(mask_id=MASK, vocab_size=8, special_ids=(0, CLS, SEP, MASK))


class TableEncoder:
  """A 'model' with fixed outputs that records what it was called with."""

  def __init__(self, **outputs):
    self.outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
    self.calls = []

  def apply(self, variables, inputs_BT, **kwargs):
    self.calls.append((np.asarray(inputs_BT), kwargs))
    return self.outputs


class TinyEncoder(nn.Module):
  """Enough of BERT's interface to take gradients through: embeddings, dropout, heads."""
  vocab: int = 8

  @nn.compact
  def __call__(self, inputs_BT, *, token_types_BT, segment_ids_BT, positions_BT,
               deterministic):
    x_BTD = nn.Embed(self.vocab, 6)(inputs_BT) + nn.Embed(2, 6)(token_types_BT)
    x_BTD = nn.Dropout(0.2)(x_BTD + nn.Embed(16, 6)(positions_BT), deterministic=deterministic)
    hidden_BTD = jnp.tanh(nn.Dense(6)(x_BTD)) * (segment_ids_BT != 0)[..., None]
    pooled_BD = jnp.tanh(nn.Dense(6)(hidden_BTD[:, 0]))
    return {'mlm_logits': nn.Dense(self.vocab)(hidden_BTD), 'nsp_logits': nn.Dense(2)(pooled_BD),
            'pooled': pooled_BD, 'hidden': hidden_BTD}


def toy_batch():
  return {'inputs': np.array([[CLS, 4, 5, SEP, 6, 7, SEP, 0],
                              [CLS, 7, SEP, 5, 4, 6, SEP, 0]], np.int32),
          'token_types': np.array([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 0]], np.int32),
          'segment_ids': np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int32),
          'positions': np.tile(np.arange(8, dtype=np.int32), (2, 1)),
          'nsp_label': np.array([0, 1], np.int32)}


# Logits whose softmax is easy: row [ln 2, 0, 0, 0] over 4 classes gives p = [2/5, 1/5, ...].
def mlm_logits(batch, vocab=8):
  logits = np.zeros((*batch['inputs'].shape, vocab), np.float32)
  logits[..., 4] = math.log(2.0)  # token 4 is the most likely everywhere: p(4) = 2/9
  return logits


def test_static_mlm_equals_hand_computation():
  batch = toy_batch()
  batch['mlm_targets'] = np.array([[0, 4, 0, 0, 7, 0, 0, 0], [0, 0, 0, 5, 4, 0, 0, 0]], np.int32)
  batch['mlm_weights'] = (batch['mlm_targets'] > 0).astype(np.int32)
  model = TableEncoder(mlm_logits=mlm_logits(batch))
  loss, sums = masked_lm.loss_fn({}, batch, jax.random.key(0), model=model, settings=SETTINGS)
  # Four scored tokens: two are token 4 (p = 2/9), two are others (p = 1/9).
  expected = (2 * -math.log(2 / 9) + 2 * -math.log(1 / 9)) / 4
  assert math.isclose(float(loss), expected, rel_tol=1e-6)
  assert float(sums['weight']) == float(sums['mlm_weight']) == 4.0
  assert float(sums['mlm_correct']) == 2.0
  np.testing.assert_array_equal(model.calls[0][0], batch['inputs'])  # static: no new masking
  report = masked_lm.summarize(jax.device_get(sums))
  assert math.isclose(report['mlm_perplexity'], math.exp(expected), rel_tol=1e-6)
  assert report['mlm_accuracy'] == 0.5 and report['loss'] == report['mlm_loss']


def test_dynamic_mlm_masks_on_device_and_scores_only_selected_tokens():
  batch = toy_batch()
  logits = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
  model = TableEncoder(mlm_logits=logits)
  rng = jax.random.key(7)
  loss, sums = masked_lm.loss_fn({}, batch, rng, model=model, settings=SETTINGS)
  seen = model.calls[0][0]
  # The model saw the corrupted inputs; the loss is over the selected originals.
  corrupted, targets, weights = masking.mask_tokens(
      jax.random.fold_in(rng, 0), batch['inputs'], batch['segment_ids'], SETTINGS)
  np.testing.assert_array_equal(seen, corrupted)
  selected = np.asarray(weights) > 0
  assert 1 <= selected.sum() <= 2  # 10 maskable tokens at 15%: 1 or 2
  log_p = jax.nn.log_softmax(logits)
  picked = np.take_along_axis(np.asarray(log_p), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), -picked[selected].mean(), rtol=1e-6)
  assert float(sums['weight']) == selected.sum()
  # Another step's RNG draws another mask (a new mask every time a sentence is seen).
  masks = {masked_lm.masked_inputs(batch, jax.random.key(s), SETTINGS)[2].tobytes()
           for s in range(20)}
  assert len(masks) > 5


def test_static_mlm_accumulates_microbatches_exactly():
  # weight = scored tokens, so the trainer's weighted slices give the whole batch's gradient.
  batch = {k: np.concatenate([v, v[::-1]]) for k, v in toy_batch().items()}
  weights = batch['inputs'] > MASK  # the 4 word tokens of each row
  weights[0] = False
  weights[0, 1] = True  # slice 0 (rows 0, 2) scores 5 tokens, slice 1 (rows 1, 3) 8
  batch.update(mlm_targets=batch['inputs'], mlm_weights=weights.astype(np.int32))
  model = TinyEncoder()
  params = model.init(jax.random.key(0), batch['inputs'], token_types_BT=batch['token_types'],
                      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
                      deterministic=True)['params']
  # Large weights, so tokens' losses differ and a slice weighting by rows would be seen.
  params = jax.tree.map(lambda p: p * 4.0, params)
  loss_fn = functools.partial(masked_lm.loss_fn, settings=SETTINGS, deterministic=True)

  def no_dropout(p, b, r, *, model, deterministic):
    del deterministic
    return loss_fn(p, b, r, model=model)

  def gradients(microbatches):
    return jax.jit(functools.partial(step_lib.accumulated_gradients, loss_fn=no_dropout,
                                     model=model, microbatches=microbatches))(
                                         params, batch, jax.random.key(0))

  whole, split = gradients(1), gradients(2)
  np.testing.assert_allclose(split[0], whole[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(split[2]), jax.tree.leaves(whole[2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_nsp_equals_hand_computation_and_binary_cross_entropy():
  batch = toy_batch()
  batch = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}  # pad row
  nsp_logits = np.array([[math.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0]], np.float32)
  model = TableEncoder(nsp_logits=nsp_logits)
  loss, sums = next_sentence.loss_fn({}, batch, jax.random.key(0), model=model)
  # Row 0: label 0 with p = 3/4; row 1: a tie, p = 1/2; row 2 is padding.
  expected = (-math.log(0.75) - math.log(0.5)) / 2
  assert math.isclose(float(loss), expected, rel_tol=1e-6)
  bce = optax.sigmoid_binary_cross_entropy(nsp_logits[:2, 1] - nsp_logits[:2, 0],
                                           batch['nsp_label'][:2].astype(np.float32))
  assert math.isclose(float(loss), float(bce.mean()), rel_tol=1e-6)
  # Row 0 right; row 1's tie predicts index 0 ("next"), wrong for label 1.
  assert float(sums['nsp_correct']) == 1.0 and float(sums['weight']) == 2.0
  report = next_sentence.summarize(jax.device_get(sums))
  assert report['nsp_accuracy'] == 0.5 and math.isclose(report['loss'], expected, rel_tol=1e-6)


def test_bert_pretraining_adds_the_two_means_from_one_forward_pass():
  batch = toy_batch()
  batch['mlm_targets'] = np.array([[0, 4, 0, 0, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  batch['mlm_weights'] = (batch['mlm_targets'] > 0).astype(np.int32)
  model = TableEncoder(mlm_logits=mlm_logits(batch),
                       nsp_logits=np.array([[math.log(3.0), 0.0], [0.0, 0.0]], np.float32))
  settings = bert_pretraining.BertPretraining(masking=SETTINGS)
  loss, sums = bert_pretraining.loss_fn({}, batch, jax.random.key(0), model=model,
                                        settings=settings)
  assert len(model.calls) == 1
  mlm = (-math.log(2 / 9) - math.log(1 / 9)) / 2
  nsp = (-math.log(0.75) - math.log(0.5)) / 2
  assert math.isclose(float(loss), mlm + nsp, rel_tol=1e-6)
  assert float(sums['weight']) == 2.0  # rows: each slice's NSP mean is exact
  report = bert_pretraining.summarize(jax.device_get(sums))
  assert set(report) >= {'loss', 'mlm_loss', 'mlm_accuracy', 'mlm_perplexity', 'nsp_loss',
                         'nsp_accuracy'}
  assert math.isclose(report['mlm_loss'], mlm, rel_tol=1e-6)
  assert math.isclose(report['nsp_loss'], nsp, rel_tol=1e-6)
  assert math.isclose(report['loss'], mlm + nsp, rel_tol=1e-6)
  assert report['mlm_accuracy'] == 0.5 and report['nsp_accuracy'] == 0.5
  half = bert_pretraining.BertPretraining(masking=SETTINGS, nsp_weight=0.5)
  loss_half, _ = bert_pretraining.loss_fn({}, batch, jax.random.key(0), model=model,
                                          settings=half)
  assert math.isclose(float(loss_half), mlm + 0.5 * nsp, rel_tol=1e-6)


def test_bert_pretraining_trains_under_jit_with_dynamic_masks():
  batch = toy_batch()
  model = TinyEncoder()
  params = model.init(jax.random.key(0), batch['inputs'], token_types_BT=batch['token_types'],
                      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
                      deterministic=True)['params']
  # 4 maskable tokens a row: at rate 0.5 each row scores exactly 2 (at 0.15, 0 or 1).
  half = masking.MaskedLM(mask_id=MASK, vocab_size=8, special_ids=(0, CLS, SEP, MASK), rate=0.5)
  loss_fn = functools.partial(bert_pretraining.loss_fn, model=model,
                              settings=bert_pretraining.BertPretraining(masking=half))
  (loss, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, batch, jax.random.key(3))
  assert np.isfinite(float(loss)) and float(sums['mlm_weight']) == 4.0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('name', ['masked_lm', 'next_sentence', 'bert_pretraining',
                                  'classification', 'regression'])
def test_objectives_are_registered_by_name(name):
  module = objectives.get(name)
  assert callable(module.loss_fn) and callable(module.summarize)
