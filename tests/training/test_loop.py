"""A short run end to end: train -> checkpoint -> resume -> evaluate, on a corpus of our own."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt
from training import chaos
from training import checkpoint
from training import loop
from training import metrics
from training import step as step_lib

def tiny_config(tmp_path, **train):
  config = gpt.get_config('size=tiny')
  config.unlock()
  config.data.files = chaos.write_corpus(str(tmp_path / 'corpus'))
  config.data.data_dir = str(tmp_path / 'data')
  config.data.vocab_size = 128
  config.train.update(dict(dict(num_steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                               keep_checkpoints=5), **train))
  config.lock()
  return config


def final_params(workdir, step):
  config = loop.ml_collections.ConfigDict(checkpoint.restore_config(
      checkpoint.manager(os.path.join(workdir, 'checkpoints')), step))
  exp = loop.build(config)
  abstract, shardings = exp.abstract_state()
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'))
  return checkpoint.restore(mngr, step, abstract, shardings)


def test_train_resume_and_eval_match_an_uninterrupted_run(tmp_path):
  config = tiny_config(tmp_path)
  full = str(tmp_path / 'full')
  report = loop.train_and_evaluate(config, full)
  assert np.isfinite(report['loss'])

  # An interrupted run: the same workdir as it stood after the step-3 checkpoint.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  loop.train_and_evaluate(config, resumed)

  a, b = final_params(full, 6), final_params(resumed, 6)
  assert int(a.step) == int(b.step) == 6
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
  # The resumed run logged steps 4..6 only, with the same losses as the full run.
  full_train = {m['step']: m['loss'] for m in metrics.read_metrics(full) if m['split'] == 'train'}
  resumed_train = {m['step']: m['loss'] for m in metrics.read_metrics(resumed)
                   if m['split'] == 'train'}
  assert sorted(resumed_train) == [4, 6]
  assert resumed_train[6] == full_train[6]


def test_eval_reproduces_the_training_runs_own_validation(tmp_path):
  import importlib
  eval_cli = importlib.import_module('eval')  # eval.py, the CLI
  config = tiny_config(tmp_path)
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir)
  logged = {m['step']: m for m in metrics.read_metrics(workdir) if m['split'] == 'validation'}
  evaluator = eval_cli.Evaluator(workdir)
  for step in (3, 6):
    result = evaluator.evaluate(step, splits=('validation',))['validation']
    for name in ('loss', 'perplexity', 'accuracy', 'tokens'):
      assert result[name] == pytest.approx(logged[step][name], rel=1e-6), name
  assert os.path.exists(os.path.join(workdir, 'eval', 'step_6.json'))


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
  """Slices of a batch, accumulated, give the whole batch's loss, gradients and update."""
  config = tiny_config(tmp_path)
  exp = loop.build(config)
  state, _ = step_lib.create_state(jax.random.key(0), exp.model, exp.tx, exp.sample_inputs,
                                   exp.mesh, exp.rules)
  batch = next(loop.pipeline.train_iterator(exp.data, exp.tokenizer))
  # Unequal token counts per slice, so a plain mean of the slices' losses would be wrong.
  batch['segment_ids'][1::2, -5:] = 0
  batch = {n: jnp.asarray(v) for n, v in batch.items()}
  rng = jax.random.key(1)

  def run(k):
    grads = jax.jit(functools.partial(
        step_lib.accumulated_gradients, loss_fn=exp.objective.loss_fn, model=exp.model,
        microbatches=k))(state.params, batch, rng)
    step = jax.jit(functools.partial(
        step_lib.train_step, loss_fn=exp.objective.loss_fn, model=exp.model, seed=0,
        learning_rate_fn=exp.learning_rate_fn, microbatches=k))
    return grads, step(state, batch)[0].params

  (loss_1, sums_1, grads_1), params_1 = run(1)
  for k in (2, 4):
    (loss_k, sums_k, grads_k), params_k = run(k)
    np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
    assert float(sums_k['weight']) == float(sums_1['weight'])
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    jax.tree.map(close, grads_k, grads_1)
    jax.tree.map(close, params_k, params_1)
