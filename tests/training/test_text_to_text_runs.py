"""Text-to-text runs end to end: a tiny mixture trained from scratch, scored per task
during training and by eval.py (a row per (split, task) beside its baseline); ROUGE and
accuracy on hand examples; the per-task report's plumbing; the fine-tuning config's
model and tokenizer taken from a pretraining workdir."""

import csv
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from configs import text_to_text as text_to_text_config
from configs import translation as translation_config
from data import pipeline
from data import text_to_text
from training import checkpoint
from training import loop
from training import translation

MIXTURE = ('translate', 'modernize', 'genre')
PREFIXES = {'translate': 'translate English to Spanish: ', 'modernize': 'modernize: ',
            'genre': 'genre: '}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """4 steps of the tiny from-scratch mixture, one layer per stack (its vocabulary trained
  on the mixture)."""
  workdir = str(tmp_path_factory.mktemp('t2t'))
  config = text_to_text_config.get_config('mixture=translate+modernize+genre,steps=4')
  config.unlock()
  config.train.update(eval_every=4, checkpoint_every=4, eval_batches=1)
  config.model.num_layers = 1  # each stack: compiling train, eval and beam steps dominates
  config.translate.update(max_len=6, batch_size=4, beam_size=2)
  config.lock()
  report = loop.train_and_evaluate(config, workdir)
  return workdir, config, report


def test_training_reports_the_validation_loss_of_the_mixture(run):
  _, _, report = run
  assert np.isfinite(report['loss']) and report['nll'] > 0 and report['tokens'] > 0


def test_training_scores_each_task_with_its_metrics(monkeypatch):
  """loop.translation_scores of a text-to-text run: the model's scores of every task on
  `translate.eval_examples` validation examples each, no baselines."""
  cfg = pipeline.DataConfig(task='text_to_text', mixture='translate,modernize,genre')
  seen = []

  def fake_translate(exp, params, sources, settings, progress=False):
    del exp, params, settings, progress
    seen.append(sources)
    return ['law'] * len(sources)
  monkeypatch.setattr(translation, 'translate', fake_translate)
  config = text_to_text_config.get_config('mixture=translate+modernize+genre')
  config.unlock()
  config.translate.eval_examples = 3
  report = loop.translation_scores(types.SimpleNamespace(config=config, data=cfg), None)
  assert list(report) == ['translate/bleu', 'translate/chrf', 'modernize/bleu',
                          'modernize/chrf', 'modernize/rouge1', 'modernize/rouge2',
                          'modernize/rougeL', 'genre/accuracy']
  assert [len(s) for s in seen] == [3, 3, 3]
  assert [s[0].split(':')[0] for s in seen] == ['translate English to Spanish', 'modernize',
                                                'genre']
  genre = text_to_text.examples(cfg, text_to_text.get('genre'), 'validation', 3)
  assert report['genre/accuracy'] == np.mean([e['targets'] == 'law' for e in genre])


def _table(stdout: str) -> dict[str, dict[str, str]]:
  lines = [line for line in stdout.splitlines() if line.startswith('| ')]
  header = [cell.strip() for cell in lines[0].strip('|').split('|')]
  rows = {}
  for line in lines[1:]:
    cells = [cell.strip() for cell in line.strip('|').split('|')]
    rows[cells[0]] = {name: cell for name, cell in zip(header[1:], cells[1:]) if cell}
  return rows


def test_eval_prints_a_row_per_task_and_writes_its_outputs(run):
  workdir, config, _ = run
  result = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={workdir}', '--splits=test', '--max_examples=3',
       '--beam_size=2', '--translate=genre: In the beginning'],
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _table(result.stdout)
  assert set(rows['test']) >= {'loss', 'perplexity'}  # the loss over every task's examples
  generation = {'translate': {'bleu', 'chrf'}, 'modernize': {'bleu', 'chrf', 'rouge1',
                                                             'rouge2', 'rougeL'}}
  for task, names in generation.items():
    assert set(rows[f'test {task}']) == names
    assert set(rows[f'test {task} (copy the source)']) == names
  assert set(rows['test genre']) == set(rows['test genre (majority class)']) == {'accuracy'}
  # The majority baseline: the training split's most frequent genre among 3 test verses.
  cfg = pipeline.DataConfig(**config.data)
  genre = text_to_text.get('genre')
  majority = text_to_text.majority_target(cfg, genre)
  targets = [e['targets'] for e in text_to_text.examples(cfg, genre, 'test', 3)]
  assert float(rows['test genre (majority class)']['accuracy']) == pytest.approx(
      np.mean([t == majority for t in targets]), abs=1e-4)
  # Copying the source scores what the metrics give the untouched verses.
  modernize = text_to_text.examples(cfg, text_to_text.get('modernize'), 'test', 3)
  copy = translation.scores([e['source'] for e in modernize],
                            [e['targets'] for e in modernize], ('bleu', 'rouge'))
  for name in ('bleu', 'rougeL'):
    assert float(rows['test modernize (copy the source)'][name]) == pytest.approx(
        copy[name], abs=1e-4)
  assert "'genre: In the beginning' -> " in result.stdout
  for task in MIXTURE:
    with open(os.path.join(workdir, 'eval', f'translations_test_{task}_4.tsv')) as f:
      written = list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
    assert written[0] == ['source', 'reference', 'translation'] and len(written) == 4
    assert all(row[0].startswith(PREFIXES[task]) for row in written[1:])


def test_fine_tuning_from_a_text_to_text_run_keeps_its_model_tokenizer_and_parameters(run):
  workdir, config, _ = run
  tuned = text_to_text_config.get_config(f'init_from={workdir},mixture=modernize,steps=2')
  assert tuned.train.init_from == workdir and tuned.data.mixture == 'modernize'
  assert tuned.model.to_dict() == config.model.to_dict()
  # The source run trained its vocabulary on its mixture; the fine-tuning run loads it.
  assert tuned.data.tokenizer_path == os.path.abspath(os.path.join(
      pipeline.data_dir(pipeline.DataConfig()), 'tokenizers',
      'text_to_text-genre-modernize-translate_bpe_512.model'))
  exp = loop.build(tuned)
  source = loop.build(config)
  assert exp.tokenizer.encode('modernize: thou art') == source.tokenizer.encode(
      'modernize: thou art')
  abstract, shardings = exp.abstract_state()
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.params)
  params = loop.init_from(workdir, zeros, shardings.params)
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  saved, _ = checkpoint.restore_latest(mngr, *source.abstract_state())
  mngr.close()
  # Every parameter is the run's, copied exactly over the (zero) initialisation.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, saved.params)
  assert all(np.any(np.asarray(p) != 0) for p in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------
# Metrics on hand examples.

def test_rouge_by_hand():
  same = 'In the beginning God created the heavens'
  assert translation.rouge([same], [same]) == {'rouge1': 100.0, 'rouge2': 100.0,
                                               'rougeL': 100.0}
  assert translation.rouge(['a b c'], ['x y z']) == {'rouge1': 0.0, 'rouge2': 0.0,
                                                     'rougeL': 0.0}
  # unigrams: 2 shared of 3 and 4 (F = 4/7); bigrams: 'the cat' of 2 and 3 (F = 2/5);
  # the longest common subsequence is 'the cat'.
  got = translation.rouge(['the cat sat'], ['The cat ran away'])
  assert got == pytest.approx({'rouge1': 400 / 7, 'rouge2': 40.0, 'rougeL': 400 / 7})
  # Averaged over examples; accented words are whole words ('añadió' is not 'añadir').
  assert translation.rouge([same, 'añadió'], [same, 'añadir'])['rouge1'] == 50.0


def test_accuracy_is_exact_match_of_the_words():
  assert translation.accuracy(['law', ' poetry ', 'gospel', 'Law'],
                              ['law', 'poetry', 'letter', 'law']) == 0.5


def test_scores_computes_the_metrics_asked_for():
  got = translation.scores(['law', 'poetry'], ['law', 'letter'], ('accuracy',))
  assert got == {'accuracy': 0.5}
  got = translation.scores(['a b c d'], ['a b c d'], ('bleu', 'rouge'))
  assert set(got) == {'bleu', 'rouge1', 'rouge2', 'rougeL'} and got['rougeL'] == 100.0
  with pytest.raises(ValueError, match="unknown metrics \\['meteor'\\]"):
    translation.scores(['a'], ['a'], ('meteor',))


def test_each_task_is_scored_with_its_own_metrics_and_baseline(monkeypatch):
  """translation.evaluate's per-task report, with a decoder that answers every task
  perfectly except genre, where it always says 'law'."""
  cfg = pipeline.DataConfig(task='text_to_text', mixture='modernize,genre', seq_len=32)
  answers = {e['inputs']: e['targets'] for task in ('modernize', 'genre')
             for e in text_to_text.examples(cfg, text_to_text.get(task), 'test', 5)}

  def fake_translate(exp, params, sources, settings, progress=False):
    del exp, params, settings, progress
    return ['law' if s.startswith('genre: ') else answers[s] for s in sources]
  monkeypatch.setattr(translation, 'translate', fake_translate)
  exp = types.SimpleNamespace(data=cfg)
  report, rows = translation.evaluate(exp, None, 'test', translation.TranslateConfig(), 5)
  genre = [answers[s] for s in answers if s.startswith('genre: ')]
  majority = text_to_text.majority_target(cfg, text_to_text.get('genre'))
  assert report == pytest.approx({
      'modernize/bleu': 100.0, 'modernize/chrf': 100.0, 'modernize/rouge1': 100.0,
      'modernize/rouge2': 100.0, 'modernize/rougeL': 100.0,
      **{f'modernize/copy_{k}': v for k, v in translation.scores(
          [e['source'] for e in text_to_text.examples(cfg, text_to_text.get('modernize'),
                                                      'test', 5)],
          [answers[s] for s in answers if s.startswith('modernize: ')],
          ('bleu', 'chrf', 'rouge')).items()},
      'modernize/examples': 5.0,
      'genre/accuracy': np.mean([g == 'law' for g in genre]),
      'genre/majority_accuracy': np.mean([g == majority for g in genre]),
      'genre/examples': 5.0})
  assert [r['task'] for r in rows] == ['modernize'] * 5 + ['genre'] * 5
  assert translation.task_score_names(cfg) == [
      'modernize/bleu', 'modernize/chrf', 'modernize/rouge1', 'modernize/rouge2',
      'modernize/rougeL', 'genre/accuracy']


def test_a_seq2seq_report_gains_rouge_beside_bleu(monkeypatch):
  cfg = pipeline.DataConfig(task='seq2seq', name='bible/kjv_web', source_key='kjv',
                            target_key='web', seq_len=32)
  monkeypatch.setattr(translation, 'translate',
                      lambda exp, params, sources, settings, progress=False: list(sources))
  report, _ = translation.evaluate(types.SimpleNamespace(data=cfg), None, 'test',
                                   translation.TranslateConfig(), 4)
  names = ('bleu', 'chrf', 'rouge1', 'rouge2', 'rougeL')
  assert set(report) == {*names, *(f'copy_{n}' for n in names), 'examples'}
  assert all(report[n] == report[f'copy_{n}'] for n in names)  # the decoder copied
  assert 0 < report['rougeL'] < 100


def test_outputs_drop_the_sentinels_a_pretrained_t5_writes(monkeypatch):
  class Letters:
    """'a'.. 'e' as ids 3..7; pad 0, bos 1, eos 2; ids from 8 up are sentinels."""
    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 8

    def encode(self, text):
      return [3 + 'abcde'.index(c) for c in text]

    def decode(self, ids):
      assert all(i < self.vocab_size for i in ids), ids  # as sentencepiece, which raises
      return ''.join('abcde'[i - 3] for i in ids if i > 2)

  best_BRL = np.asarray([[[3, 9, 4, 2]], [[8, 5, 2, 0]]])  # [B=2, R=1, L=4]
  monkeypatch.setattr(translation.seq2seq_decoding, 'translate',
                      lambda *args, **kwargs: (best_BRL, None))
  exp = types.SimpleNamespace(tokenizer=Letters(), model=None,
                              data=pipeline.DataConfig(seq_len=8))
  settings = translation.TranslateConfig(batch_size=2)
  assert translation.translate(exp, None, ['ab', 'c'], settings) == ['ab', 'c']


# ---------------------------------------------------------------------------------------
# The config.

def _pretraining_workdir(path, **data) -> str:
  """A workdir whose config.json is a T5-like span-corruption run's (no checkpoint)."""
  base = translation_config.get_config('size=tiny').to_dict()
  model = {**base['model'], 'vocab_size': 522}  # 512 pieces + 10 sentinels
  data = {'name': 'bible/en_es', 'text_key': 'en,es', 'task': 'span_corruption',
          'tokenizer': 'bpe', 'vocab_size': 512, 'seq_len': 32, 'batch_size': 8,
          'extra_ids': 10, **data}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({**base, 'model_name': 'encoder_decoder', 'model': model, 'data': data}, f)
  return str(path)


def test_config_takes_model_and_tokenizer_from_the_pretraining_workdir(tmp_path):
  # Its data dir relative to where it ran (here): the fine-tuning run may run elsewhere.
  data_dir = os.path.relpath(pipeline.data_dir(pipeline.DataConfig()))
  workdir = _pretraining_workdir(tmp_path / 't5', data_dir=data_dir)
  c = text_to_text_config.get_config(
      f'init_from={workdir},init_step=7,mixture=translate+modernize,'
      'mixing=translate=1+modernize=3,steps=50,learning_rate=0.0005')
  source = json.load(open(os.path.join(workdir, 'config.json')))
  assert c.model.to_dict() == source['model'] and c.model_name == 'encoder_decoder'
  # Its tokenizer: the sentencepiece model its data config trains (cached by the pipeline).
  expected = pipeline.load_tokenizer(pipeline.DataConfig(**source['data'])).path
  assert os.path.isabs(c.data.tokenizer_path)
  assert c.data.tokenizer_path == os.path.abspath(expected)
  assert os.path.basename(expected) == 'bible_en_es-en-es_bpe_512.model'
  assert (c.data.tokenizer, c.data.vocab_size, c.data.get('extra_ids', 0)) == ('bpe', 512, 0)
  assert (c.data.seq_len, c.data.targets_len, c.translate.max_len) == (32, 32, 32)
  assert (c.train.init_from, c.train.init_step, c.train.num_steps) == (workdir, 7, 50)
  assert (c.data.mixture, c.data.mixing) == ('translate,modernize', 'translate=1,modernize=3')
  assert (c.optimizer.decay, c.optimizer.learning_rate) == ('constant', 0.0005)
  cfg = pipeline.DataConfig(**c.data)
  assert text_to_text.rates(cfg, [10, 10]) == {'translate': 0.25, 'modernize': 0.75}
  assert pipeline.load_tokenizer(cfg).path == c.data.tokenizer_path


def test_config_copies_a_named_tokenizer_path(tmp_path):
  workdir = _pretraining_workdir(tmp_path / 't5', tokenizer_path='/models/spm.model')
  assert text_to_text_config.get_config(
      f'init_from={workdir}').data.tokenizer_path == '/models/spm.model'


def test_config_without_init_from_is_the_from_scratch_baseline():
  c = text_to_text_config.get_config('size=small,cap=5000,batch_size=16,seed=3')
  small = translation_config.get_config('size=small')
  assert c.model.to_dict() == small.model.to_dict() and not c.train.init_from
  assert (c.data.task, c.data.tokenizer_path, c.data.mixing_cap) == ('text_to_text', '', 5000)
  assert (c.data.batch_size, c.data.seed, c.seed) == (16, 3, 3)
  assert c.data.mixture == 'translate,modernize,genre' and c.translate.eval_examples == 100
  assert c.objective == 'seq2seq' and c.objective_settings.label_smoothing == 0.1
  pipeline.DataConfig(**c.data)  # every field is the pipeline's


def test_config_errors_name_the_argument(tmp_path):
  with pytest.raises(FileNotFoundError, match='init_from='):
    text_to_text_config.get_config(f'init_from={tmp_path}')
  bert = _pretraining_workdir(tmp_path / 'bert')
  source = json.load(open(os.path.join(bert, 'config.json')))
  with open(os.path.join(bert, 'config.json'), 'w') as f:
    json.dump({**source, 'model_name': 'bert'}, f)
  with pytest.raises(ValueError, match="holds a 'bert' model"):
    text_to_text_config.get_config(f'init_from={bert}')
  long_rows = _pretraining_workdir(tmp_path / 'long', seq_len=64, tokenizer_path='/x.model')
  with pytest.raises(ValueError, match='seq_len=64 exceed its model.max_len=32'):
    text_to_text_config.get_config(f'init_from={long_rows}')
