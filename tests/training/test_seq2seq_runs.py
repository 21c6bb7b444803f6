"""The encoder-decoder Transformer end to end: train on bible/en_es, BLEU during training
and from eval.py, translations of given sentences, decoding that matches teacher forcing."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import translation as translation_config
from models import seq2seq_decoding
from training import loop
from training import translation


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """8 steps of the tiny config, BLEU on 8 validation pairs at each evaluation."""
  workdir = str(tmp_path_factory.mktemp('en_es'))
  config = translation_config.get_config('size=tiny')
  config.unlock()
  config.train.update(num_steps=8, eval_every=4, checkpoint_every=8, eval_batches=2)
  config.translate.update(eval_examples=8, max_len=8, batch_size=8)
  config.lock()
  report = loop.train_and_evaluate(config, workdir)
  return workdir, config, report


def test_training_reports_loss_and_bleu(run):
  _, _, report = run
  for name in ('loss', 'nll', 'perplexity', 'accuracy', 'bleu', 'chrf'):
    assert np.isfinite(report[name]), name
  assert report['loss'] > report['nll'] > 0  # label smoothing adds to the NLL


def test_scores_are_sacrebleus():
  same = 'the cat sat on the mat'
  assert translation.scores([same], [same]) == {'bleu': pytest.approx(100.0),
                                                'chrf': pytest.approx(100.0)}
  assert translation.scores(['a b c d'], ['w x y z'])['bleu'] == 0.0
  with pytest.raises(ValueError, match='1 hypotheses for 2'):
    translation.scores(['a'], ['a', 'b'])


def test_beam_of_one_is_greedy_and_wider_beams_score_no_worse(run):
  workdir, config, _ = run
  exp = loop.build(config)
  state, _ = loop.checkpoint.restore_latest(
      loop.checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False),
      *exp.abstract_state())
  sources = ['In the beginning God created the heavens', 'And God said']
  from data import seq2seq_data  # pylint: disable=g-import-not-at-top
  tokens, segments = seq2seq_data.source_rows(exp.tokenizer, sources, exp.data.seq_len)
  tok = exp.tokenizer
  kwargs = dict(segment_ids_BS=segments, max_len=8, bos_id=tok.bos_id, eos_id=tok.eos_id)
  greedy, _ = seq2seq_decoding.translate(exp.model, state.params, tokens, sampler='greedy',
                                         **kwargs)
  beam1, _ = seq2seq_decoding.translate(exp.model, state.params, tokens, beam_size=1, alpha=0.0,
                                        **kwargs)
  np.testing.assert_array_equal(beam1, greedy)
  _, scores1 = seq2seq_decoding.translate(exp.model, state.params, tokens, beam_size=1,
                                          alpha=0.0, **kwargs)
  _, scores4 = seq2seq_decoding.translate(exp.model, state.params, tokens, beam_size=4,
                                          alpha=0.0, **kwargs)
  assert (np.asarray(scores4[:, 0]) >= np.asarray(scores1[:, 0]) - 1e-5).all()


def test_eval_scores_splits_beside_the_copy_baseline_and_translates_sentences(run):
  workdir, _, _ = run
  result = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={workdir}', '--splits=test', '--max_examples=8',
       '--beam_size=2', '--translate=In the beginning'],
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {line.split('|')[1].strip(): line for line in result.stdout.splitlines()
          if line.startswith('| ')}
  assert 'bleu' in rows['split'] and 'test' in rows and 'test (copy the source)' in rows
  assert "'In the beginning' -> " in result.stdout and '[beam 2, alpha 0.6]' in result.stdout
  written = os.path.join(workdir, 'eval', 'translations_test_8.tsv')
  lines = open(written).read().splitlines()
  assert lines[0] == 'source\treference\ttranslation' and len(lines) == 9


def test_an_rnn_with_attention_trains_and_translates_with_beam_search(tmp_path):
  """The RNN era on the same pipeline, objective and decoding as the Transformer."""
  from configs import bottleneck_study  # pylint: disable=g-import-not-at-top
  config = bottleneck_study.get_config('variant=rnn_bahdanau,num_steps=4')
  config.unlock()
  config.data.update(vocab_size=512, seq_len=32, targets_len=32, batch_size=8)
  config.model.update(vocab_size=512, max_len=32, embed_dim=16, hidden_dim=16)
  config.train.update(eval_batches=1)
  config.translate.update(max_len=6, batch_size=4, beam_size=2, eval_examples=4)
  config.lock()
  report = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(report['loss']) and np.isfinite(report['bleu'])
