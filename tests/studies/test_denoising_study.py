"""The T5/BART pretraining studies: each variant's configs, the page from finished runs."""

import json
import os

import pytest

from studies import denoising_study as study
from training import checkpoint


@pytest.mark.parametrize('name', ['bart', 't5'])
def test_each_variant_pretrains_with_its_own_corruption_and_fine_tunes_alike(name, tmp_path):
  settings = study.Settings(study=name, pretrain_steps=7, finetune_steps=5)
  corruptions = set()
  for variant, spec in study.STUDIES[name].items():
    pretrain = study.pretrain_config(settings, variant, seed=2)
    assert pretrain.train.num_steps == 7 and pretrain.seed == pretrain.data.seed == 2
    corruptions.add((pretrain.data.task, pretrain.data.get('noising', '')))
    if spec is not None:  # a pretrained variant starts fine-tuning from its checkpoint
      directory = tmp_path / f'{variant}-s2' / 'pretrain'
      directory.mkdir(parents=True)
      checkpoint.write_json(str(directory / 'config.json'), pretrain.to_dict())
    finetune = study.finetune_config(settings, variant, 2, str(tmp_path))
    assert finetune.data.mixture == study.TASK and finetune.train.num_steps == 5
    assert finetune.model.to_dict() == pretrain.model.to_dict()
    assert finetune.train.init_from == ('' if spec is None else
                                        str(tmp_path / f'{variant}-s2' / 'pretrain'))
  # Every pretrained variant corrupts differently ('none' repeats the family's default).
  assert len(corruptions) == len(study.STUDIES[name]) - 1


def _finished(workdir, variant, seed, bleu, pretrained=True):
  name = f'{variant}-s{seed}'
  for run, loss in (('pretrain', 3.0), ('finetune', 2.0)):
    if run == 'pretrain' and not pretrained:
      continue
    os.makedirs(os.path.join(workdir, name, run), exist_ok=True)
    checkpoint.write_json(os.path.join(workdir, name, run, 'result.json'),
                          {'train_seconds': 10.0, 'validation': {'loss': loss}})
  checkpoint.write_json(os.path.join(workdir, name, study.TEST), {
      'bleu': bleu, 'chrf': bleu + 10, 'rougeL': bleu + 20, 'copy_bleu': 20.0,
      'copy_chrf': 40.0, 'copy_rougeL': 60.0, 'examples': 50.0})


def test_page_reads_the_finished_runs_and_says_what_separates(tmp_path):
  workdir = str(tmp_path)
  for seed, (a, b) in enumerate([(30.0, 20.0), (31.0, 21.0), (32.0, 22.0)]):
    _finished(workdir, 'span_corruption', seed, a)
    _finished(workdir, 'prefix_lm', seed, b)
  _finished(workdir, 'none', 0, 5.0, pretrained=False)
  settings = study.Settings(study='t5')
  rows = study.collect(settings, workdir)
  assert [len(rows[v]) for v in study.STUDIES['t5']] == [1, 3, 0, 3]
  lines = study.reading(rows)
  assert 'span corruption' in lines[0] and '31.00' in lines[0]
  assert any('prefix LM: +10.00 BLEU, beyond' in line for line in lines)
  assert not any('below copying' in line for line in lines)  # 31 > the copy's 20
  out = tmp_path / 'page.md'
  study.write_report(settings, workdir, str(out))
  page = out.read_text()
  assert 'Partial: 7 of 12 runs' in page
  assert '| span corruption | 3 | 31.00 ± 1.00 |' in page
  assert '| no pretraining | 1 | 5.00 |' in page and 'copy the source (baseline) | — | 20.00' in page
  assert (tmp_path / 'page.png').exists()


def test_close_variants_are_within_the_spread(tmp_path):
  workdir = str(tmp_path)
  for seed, (a, b) in enumerate([(30.0, 29.0), (33.0, 31.0), (27.0, 28.0)]):
    _finished(workdir, 'infill', seed, a)
    _finished(workdir, 'mask', seed, b)
  rows = study.collect(study.Settings(study='bart'), workdir)
  assert any('within the seeds' in line for line in study.reading(rows))
  for runs in rows.values():
    for r in runs:
      r['copy_bleu'] = 40.0
  assert 'below copying the source (40.00 BLEU)' in study.reading(rows)[-1]
  with open(os.path.join(workdir, 'infill-s0', study.TEST)) as f:
    assert json.load(f)['bleu'] == 30.0
