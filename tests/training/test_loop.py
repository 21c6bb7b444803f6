"""A short run end to end: train -> checkpoint -> resume -> evaluate, on a corpus of our own."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt
from tests import tolerances
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


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
  """(exp, initial state, a batch) of the tiny config, with a nonzero learning rate at step 0.

  No warmup, so the first update moves every parameter. Adam's eps is 1e-3 so an update
  stays proportional to small gradients (with eps=1e-8 a gradient near 1e-8 becomes a full
  step whose size turns on its last bits, and the update comparisons below would be luck),
  and no clipping, which would hide a wrongly scaled gradient from the update.
  """
  config = tiny_config(tmp_path_factory.mktemp('experiment'), num_steps=20)
  config.unlock()
  config.optimizer.warmup_steps = 0
  config.optimizer.eps = 1e-3
  config.optimizer.clip_norm = 1e6
  config.lock()
  exp = loop.build(config)
  state, _ = step_lib.create_state(jax.random.key(0), exp.model, exp.tx, exp.sample_inputs,
                                   exp.mesh, exp.rules)
  batch = next(loop.pipeline.train_iterator(exp.data, exp.tokenizer))
  return exp, state, batch


_STEPS = {}


def _train_step(exp, loss_fn=None, microbatches=1):
  """train_step jitted once per (experiment, loss, microbatches): tests share compilations."""
  key = (id(exp), loss_fn, microbatches)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(functools.partial(
        step_lib.train_step, loss_fn=loss_fn or exp.objective.loss_fn, model=exp.model, seed=0,
        learning_rate_fn=exp.learning_rate_fn, microbatches=microbatches))
  return _STEPS[key]


def test_a_few_steps_lower_the_training_loss_well_below_its_start(experiment):
  exp, state, batch = experiment
  batch = {n: jnp.asarray(v) for n, v in batch.items()}
  step = _train_step(exp)
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  # ~ln(128) = 4.85 at the start; a model fitting this one batch falls well below it.
  assert losses[-1] < losses[0] - 0.5, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


@jax.custom_vjp
def _nan_gradient(x):
  return x


_nan_gradient.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))


def test_a_non_finite_gradient_with_a_finite_loss_leaves_the_state_as_it_was(experiment):
  exp, state, batch = experiment
  batch = {n: jnp.asarray(v) for n, v in batch.items()}
  first = sorted(step_lib.finite_flags(0.0, state.params))[1]  # 'grad/<a parameter>'

  def poisoned(params, batch, rng, **kwargs):  # the same loss; NaN gradient for one leaf
    leaves, tree = jax.tree.flatten(params)
    paths = ['grad/' + jax.tree_util.keystr(p, simple=True, separator='/')
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    leaves = [_nan_gradient(x) if path == first else x for path, x in zip(paths, leaves)]
    return exp.objective.loss_fn(jax.tree.unflatten(tree, leaves), batch, rng, **kwargs)

  new_state, m = _train_step(exp, loss_fn=poisoned)(state, batch)
  finite = {name: bool(flag) for name, flag in m['finite'].items()}
  assert np.isfinite(float(m['loss'])) and finite['loss']
  assert [name for name, ok in finite.items() if not ok] == [first]
  assert int(new_state.step) == 1  # the step counts, the update is not applied
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, state.opt_state)


def test_gradient_accumulation_equals_the_whole_batch(experiment):
  """Slices of a batch, accumulated, give the whole batch's loss, gradients and update
  (parameters and optimizer state, after a step whose learning rate is not 0)."""
  exp, state, batch = experiment
  assert float(exp.learning_rate_fn(0)) > 0
  batch = dict(batch)
  # Unequal token counts per slice, so a plain mean of the slices' losses would be wrong.
  batch['segment_ids'] = batch['segment_ids'].copy()
  batch['segment_ids'][1::2, -5:] = 0
  batch = {n: jnp.asarray(v) for n, v in batch.items()}
  rng = jax.random.key(1)

  def run(k):
    grads = jax.jit(functools.partial(
        step_lib.accumulated_gradients, loss_fn=exp.objective.loss_fn, model=exp.model,
        microbatches=k))(state.params, batch, rng)
    return grads, _train_step(exp, microbatches=k)(state, batch)[0]

  (loss_1, sums_1, grads_1), state_1 = run(1)
  update_1 = jax.tree.map(jnp.subtract, state_1.params, state.params)
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(update_1))
  for k in (2, 4):
    (loss_k, sums_k, grads_k), state_k = run(k)
    np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
    assert float(sums_k['weight']) == float(sums_1['weight'])
    # Tolerances scale with the trees: a bare atol=1e-8 failed on CI by summation order.
    tolerances.assert_trees_close(grads_k, grads_1, scale=1e-4)
    update_k = jax.tree.map(jnp.subtract, state_k.params, state.params)
    tolerances.assert_trees_close(update_k, update_1, scale=1e-4)
    tolerances.assert_trees_close(state_k.opt_state, state_1.opt_state, scale=1e-4)
