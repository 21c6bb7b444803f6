"""BERT and RoBERTa pretraining end to end through the trainer, on the prepared corpus."""

import importlib
import json
import os

import numpy as np
import pytest

from configs import bert
from configs import roberta
from training import loop
from training import metrics


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
  assert 0.3 < report['nsp_accuracy'] < 0.7  # 6 steps: NSP is still at chance
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
