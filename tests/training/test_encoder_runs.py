"""BERT and RoBERTa pretraining end to end through the trainer, on the prepared corpus."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import bert
from configs import bert_finetune
from configs import electra
from configs import roberta
import models
from training import loop
from training import metrics
from training import step as step_lib


def _tiny(config, tmp_path, **train):
  config.unlock()
  config.data.vocab_size = 512
  config.train.update(dict(dict(num_steps=6, log_every=1, eval_every=6, checkpoint_every=6,
                                eval_batches=4), **train))
  config.lock()
  return config


@pytest.fixture(scope='module')
def bert_run(tmp_path_factory):
  """Tiny BERT with static masks (2 copies per pair), MLM + NSP, 16 steps of 32 pairs."""
  workdir = str(tmp_path_factory.mktemp('bert'))
  config = _tiny(bert.get_config('size=tiny,dupe_factor=2'), tmp_path_factory.getbasetemp(),
                 num_steps=16, eval_every=8, checkpoint_every=8)
  config.unlock()
  config.data.batch_size = 32
  config.optimizer.learning_rate = 5e-3
  config.optimizer.warmup_steps = 1
  config.lock()
  report = loop.train_and_evaluate(config, workdir)
  return workdir, report


def test_bert_pretraining_reports_mlm_and_nsp_and_lowers_the_loss(bert_run):
  workdir, report = bert_run
  for name in ('mlm_loss', 'mlm_accuracy', 'mlm_perplexity', 'nsp_loss', 'nsp_accuracy'):
    assert np.isfinite(report[name]), name
  assert report['loss'] == pytest.approx(report['mlm_loss'] + report['nsp_loss'], rel=1e-6)
  assert 0.3 < report["nsp_accuracy"] < 0.7  # 16 tiny steps: NSP is still at chance
  train = [m for m in metrics.read_metrics(workdir) if m['split'] == 'train']
  assert [m['step'] for m in train] == list(range(1, 17))
  # The MLM loss starts near log(V) and falls (a sign flip in the update would raise it).
  first = np.mean([m['mlm_loss'] for m in train[:2]])
  last = np.mean([m['mlm_loss'] for m in train[-4:]])
  assert last < first - 0.3, (first, last)


def test_eval_reproduces_the_bert_runs_validation(bert_run):
  workdir, report = bert_run
  evaluator = importlib.import_module('eval').Evaluator(workdir)
  result = evaluator.evaluate(16, splits=('validation',))['validation']
  for name in ('loss', 'mlm_loss', 'mlm_accuracy', 'nsp_accuracy', 'mlm_tokens'):
    assert result[name] == pytest.approx(report[name], rel=1e-6), name
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model_name'] == 'bert'


def test_roberta_trains_full_sentences_with_microbatches(tmp_path):
  config = _tiny(roberta.get_config('size=tiny,microbatches=2'), tmp_path, num_steps=2,
                 eval_every=2, checkpoint_every=2)
  assert config.data.batch_size == 16 and config.model.max_len == config.data.seq_len + 2
  report = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'nsp_loss' not in report and np.isfinite(report['mlm_loss'])
  assert report['loss'] == report['mlm_loss']


def test_electra_pretrains_and_its_discriminator_is_fine_tuned(tmp_path):
  """The README's ELECTRA path: pretrain (MLM + 50·RTD), then a classifier starts from the
  discriminator (the generator is dropped)."""
  config = _tiny(electra.get_config('size=tiny'), tmp_path, num_steps=4, eval_every=4,
                 checkpoint_every=4)
  workdir = str(tmp_path / 'electra')
  report = loop.train_and_evaluate(config, workdir)
  for name in ('mlm_loss', 'rtd_loss', 'rtd_accuracy', 'replaced_fraction'):
    assert np.isfinite(report[name]), name
  assert report['loss'] == pytest.approx(report['mlm_loss'] + 50 * report['rtd_loss'], rel=1e-6)
  # ~15% of the tokens are masked; an untrained generator replaces nearly all of them.
  assert 0.05 < report['replaced_fraction'] < 0.2

  finetune = _finetune_config(workdir)
  assert finetune.model.embed_dim == config.model.embed_dim and not finetune.model.mlm_head
  exp = loop.build(finetune)
  fresh, shardings = step_lib.create_state(jax.random.key(0), exp.model, exp.tx,
                                           exp.sample_inputs, exp.mesh, exp.rules)
  params = loop.init_from(workdir, fresh.params, shardings.params)
  discriminator = models.encoder_params('electra', evaluator_params(workdir))
  jax.tree.map(np.testing.assert_array_equal, params['bert'], discriminator)


def _finetune_config(pretrained: str, **train):
  config = bert_finetune.get_config(f'task=paraphrase,init_from={pretrained},batch_size=8')
  config.unlock()
  config.train.update(dict(dict(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                                eval_batches=2), **train))
  config.lock()
  return config


def test_finetuning_starts_from_the_pretrained_encoder_with_a_fresh_head(bert_run):
  workdir, _ = bert_run
  config = _finetune_config(workdir)
  assert config.model.num_layers == 2 and config.data.tokenizer == 'wordpiece'
  exp = loop.build(config)
  fresh, shardings = step_lib.create_state(jax.random.key(0), exp.model, exp.tx,
                                           exp.sample_inputs, exp.mesh, exp.rules)
  params = loop.init_from(workdir, fresh.params, shardings.params)
  pretrained = evaluator_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, params['bert'], pretrained)
  jax.tree.map(np.testing.assert_array_equal, params['classifier'], fresh.params['classifier'])


def test_finetuning_can_start_from_an_earlier_checkpoint(bert_run):
  workdir, _ = bert_run  # checkpoints at steps 8 and 16
  exp = loop.build(_finetune_config(workdir))
  fresh, shardings = step_lib.create_state(jax.random.key(0), exp.model, exp.tx,
                                           exp.sample_inputs, exp.mesh, exp.rules)
  params = loop.init_from(workdir, fresh.params, shardings.params, step=8)
  evaluator = importlib.import_module('eval').Evaluator(workdir)
  at_8 = jax.device_get(evaluator.restore(8).params)
  jax.tree.map(np.testing.assert_array_equal, params['bert'], at_8)
  with pytest.raises(FileNotFoundError, match=r'init_step=5: .* steps \[8, 16\] only'):
    loop.init_from(workdir, fresh.params, shardings.params, step=5)


def test_finetuning_reports_task_metrics_and_eval_prints_the_baseline(bert_run, tmp_path):
  workdir, _ = bert_run
  run = str(tmp_path / 'paraphrase')
  report = loop.train_and_evaluate(_finetune_config(workdir), run)
  for name in ('loss', 'accuracy', 'f1', 'macro_f1', 'mcc'):
    assert np.isfinite(report[name]), name
  assert report['examples'] == 16  # eval_batches=2 of 8 pairs
  result = subprocess.run([sys.executable, 'eval.py', f'--workdir={run}', '--splits=validation'],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {line.split('|')[1].strip(): line for line in result.stdout.splitlines()
          if line.startswith('| ')}
  assert 'mcc' in rows['split'] and 'validation' in rows
  assert 'validation (baseline)' in rows


def evaluator_params(workdir):
  evaluator = importlib.import_module('eval').Evaluator(workdir)
  state, _ = evaluator.restore_latest()
  return jax.device_get(state.params)


@pytest.mark.slow  # ~1.5 min alone on 2 cores: a second fine-tuning compile
def test_regression_reports_pearson_and_spearman_over_the_split(bert_run, tmp_path):
  """glue/stsb on TFDS mock data: eval.py's Spearman ranks every prediction of the split,
  and the Pearson it computes from float32 moment sums agrees with scipy's over the same
  predictions. After 2 steps the predictions barely vary, so the sums lose digits to
  cancellation (seen: -0.15562 vs -0.15489): agreement to 1%, not to float precision."""
  import scipy.stats
  import tensorflow_datasets as tfds
  workdir, _ = bert_run
  run = str(tmp_path / 'stsb')
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    config = bert_finetune.get_config(f'task=glue/stsb,init_from={workdir},batch_size=8')
    config.unlock()
    config.train.update(num_steps=2, eval_every=2, checkpoint_every=2)
    config.lock()
    assert config.objective == 'regression' and config.model.num_labels == 1
    loop.train_and_evaluate(config, run)
    evaluator = importlib.import_module('eval').Evaluator(run)
    result = evaluator.evaluate(2, splits=('validation',))['validation']
    predictions, labels = evaluator.predictions(evaluator.restore(2).params, 'validation')
  assert len(predictions) == result['examples'] == 20
  assert result['pearson'] == pytest.approx(scipy.stats.pearsonr(predictions, labels)[0],
                                            rel=1e-2)
  assert result['spearman'] == pytest.approx(scipy.stats.spearmanr(predictions, labels)[0])
