"""The bottleneck study: its configs, length buckets, and the page from recorded results."""

import json
import os

import pytest

from configs import bottleneck_study as study_config
from studies import bottleneck_study
from training import checkpoint
from training import sweep


def test_every_variant_builds_the_same_data_and_steps():
  configs = {v: study_config.get_config(f'variant={v},seed=1') for v in study_config.VARIANTS}
  assert {c.model_name for c in configs.values()} == {'rnn_seq2seq', 'encoder_decoder'}
  assert len({json.dumps(c.data.to_dict(), sort_keys=True) for c in configs.values()}) == 1
  assert len({c.train.num_steps for c in configs.values()}) == 1
  assert configs['rnn_none'].model.attention == 'none'
  assert configs['rnn_luong'].model.input_feeding
  assert len(study_config.sweep()) == len(study_config.VARIANTS) * len(study_config.SEEDS)
  with pytest.raises(ValueError, match='unknown variant'):
    study_config.get_config('variant=gru')


def test_buckets_by_source_words():
  assert [bottleneck_study.bucket_of(' '.join(['w'] * n)) for n in (1, 10, 11, 35, 51, 90)] \
      == [0, 0, 1, 3, 5, 5]
  assert bottleneck_study.bucket_name(0) == '1-10' and bottleneck_study.bucket_name(5) == '> 50'


def _fake_point(workdir, name, bleu, buckets):
  os.makedirs(os.path.join(workdir, name))
  checkpoint.write_json(sweep.result_path(workdir, name), {'train_seconds': 10.0})
  checkpoint.write_json(os.path.join(workdir, name, bottleneck_study.TEST), {
      'recipe': {}, 'bleu': bleu, 'chrf': 2 * bleu, 'copy_bleu': 1.0, 'examples': 30,
      'params': 1000, 'decode_seconds': 1.0,
      'buckets': {b: {'bleu': v, 'count': 10} for b, v in buckets.items()}})


def test_report_reads_the_recorded_scores(tmp_path):
  workdir = str(tmp_path)
  for seed, shift in enumerate((0.0, 1.0)):
    _fake_point(workdir, f'rnn_none-s{seed}', 5.0 + shift, {'1-10': 9.0 + shift, '11-20': 4.0})
    _fake_point(workdir, f'transformer-s{seed}', 8.0 + shift, {'1-10': 9.0, '11-20': 8.0 + shift})
  out = str(tmp_path / 'page.md')
  bottleneck_study.write_report(bottleneck_study.Settings(seeds=2), workdir, out)
  page = open(out).read()
  assert '| RNN, no attention | 2 | 1,000 | 10 ± 0 | 5.50 ± 0.71 |' in page
  assert 'a drop of 5.5 BLEU' in page and 'a drop of 0.5 BLEU' in page
  assert os.path.exists(str(tmp_path / 'page.png'))
  # Two of the four variants ran: the page says the study is partial, and what is missing.
  assert ('Partial: 4 of 8 runs finished** (missing seeds: RNN + Bahdanau 2, '
          'RNN + Luong (general) 2)') in page
  # One seed each: partial with one run missing, complete once every variant has one.
  _fake_point(workdir, 'rnn_bahdanau-s0', 6.0, {'1-10': 9.0, '11-20': 5.0})
  bottleneck_study.write_report(bottleneck_study.Settings(seeds=1), workdir, out)
  assert 'Partial: 3 of 4 runs finished' in open(out).read()
  _fake_point(workdir, 'rnn_luong-s0', 6.0, {'1-10': 9.0, '11-20': 5.0})
  bottleneck_study.write_report(bottleneck_study.Settings(seeds=1), workdir, out)
  assert 'Partial' not in open(out).read()
  # A longer run than the default names its steps in the command and the setup.
  bottleneck_study.write_report(bottleneck_study.Settings(seeds=1, num_steps=2000), workdir, out)
  page = open(out).read()
  assert f'--workdir={workdir} --num_steps=2000`' in page and '2000 steps for every' in page


def test_run_trains_only_the_named_variants(tmp_path, monkeypatch):
  trained, scored = [], []
  monkeypatch.setattr(bottleneck_study.sweep, 'run_point',
                      lambda point, workdir: trained.append(point.name) or {'train_seconds': 1})
  monkeypatch.setattr(bottleneck_study, 'test_scores',
                      lambda point, workdir, settings: scored.append(point.name) or {'bleu': 1})
  bottleneck_study.run(bottleneck_study.Settings(seeds=2, num_steps=4), str(tmp_path),
                       ('transformer', 'rnn_luong'))
  # Seed by seed: stopped part way, every model has its first seeds.
  assert trained == scored == ['rnn_luong-s0', 'transformer-s0', 'rnn_luong-s1',
                               'transformer-s1']
  with pytest.raises(SystemExit):
    bottleneck_study.main([f'--workdir={tmp_path}', '--variants=transformer,lstm'])
