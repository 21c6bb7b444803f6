"""The pretraining studies: their points, FLOPs accounting by hand, and the report written
from finished runs' files (synthetic ones here: the real runs take an hour)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from configs import pretraining_studies
from models import bert
from models import electra
from studies import flops
from studies import pretraining_study


def test_each_study_lists_its_variants_with_every_seed():
  points = pretraining_studies.sweep('study=generator_size')
  assert len(points) == 4 * 3
  assert points['generator-0.125-s2'] == 'family=electra,generator=0.125,seed=2,num_steps=400'
  assert list(pretraining_studies.sweep('study=masking,seeds=2')) == [
      'static-s0', 'static-s1', 'dynamic-s0', 'dynamic-s1']
  with pytest.raises(ValueError, match="unknown study 'mask'"):
    pretraining_studies.sweep('study=mask')


@pytest.mark.parametrize('arg, objective, task, nsp_head', [
    ('family=bert', 'bert_pretraining', 'nsp', True),
    ('family=bert,nsp=false', 'masked_lm', 'nsp', False),
    ('family=bert,nsp=false,task=full_sentences', 'masked_lm', 'full_sentences', False),
    ('family=mlm', 'masked_lm', 'full_sentences', False),
    ('family=electra,generator=0.5', 'electra', 'full_sentences', False),
])
def test_points_are_the_families_recipes_at_the_study_size(arg, objective, task, nsp_head):
  config = pretraining_studies.get_config(arg + ',seed=1')
  assert (config.objective, config.data.task, config.model.next_sentence) == (
      objective, task, nsp_head)
  assert config.model.embed_dim == pretraining_studies.SIZE['embed_dim']
  assert config.seed == config.data.seed == 1
  if objective == 'masked_lm':
    assert config.objective_settings.mask_fraction == 0.8
  if objective == 'electra':
    assert config.model.generator_fraction == 0.5
    assert config.objective_settings.mask_fraction == 0.85
  static = pretraining_studies.get_config('family=bert,dupe_factor=2,train_examples=1600')
  assert (static.data.dupe_factor, static.data.train_examples) == (2, 1600)


def test_flops_by_hand():
  cfg = bert.BertConfig(vocab_size=100, max_len=16, num_layers=2, num_heads=2, embed_dim=8,
                        mlp_dim=32, embedding_size=4)
  # Per layer 4·8² + 2·8·32 = 768, two layers, plus the projection 4·8.
  assert flops.encoder_matmul_params(cfg) == 2 * 768 + 32
  assert flops.mlm_head_matmul_params(cfg) == 8 * 4 + 4 * 100
  assert flops.bert_mlm_flops_per_token(cfg, 16) == 6 * (1568 + 432) + 12 * 2 * 16 * 8
  e = electra.ElectraConfig(vocab_size=100, max_len=16, num_layers=2, num_heads=2,
                            embed_dim=8, mlp_dim=32, generator_fraction=0.5)
  generator = flops.bert_mlm_flops_per_token(e.generator, 16)
  discriminator = 6 * (flops.encoder_matmul_params(e.discriminator) + 64 + 8) + 12 * 2 * 16 * 8
  assert flops.electra_flops_per_token(e, 16) == generator + discriminator
  assert flops.pretraining_flops_per_token('electra', {
      'vocab_size': 100, 'max_len': 16, 'num_layers': 2, 'num_heads': 2, 'embed_dim': 8,
      'mlp_dim': 32, 'generator_fraction': 0.5}, 16) == generator + discriminator


def _fake_study(workdir, scores):
  """Finished runs' files: scores[(variant, seed)] = test accuracy of paraphrase."""
  for (variant, seed), score in scores.items():
    name = f'{variant}-s{seed}'
    config = pretraining_studies.get_config(
        pretraining_studies.sweep('study=electra_compute')[name])
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with open(os.path.join(workdir, name, 'result.json'), 'w') as f:
      json.dump({'name': name, 'steps': 400, 'train_seconds': 120.0,
                 'validation': {'mlm_accuracy': 0.1 + seed / 100}, 'config': config.to_dict()}, f)
    for step in (100, 200, 400):
      run = os.path.join(workdir, name, 'finetune', f'paraphrase-step{step}')
      os.makedirs(run)
      with open(os.path.join(run, 'result.json'), 'w') as f:
        json.dump({'test': {'mcc': score * step / 400}}, f)


def test_report_tables_plots_and_reads_the_numbers(tmp_path):
  scores = {('electra', 0): 0.70, ('electra', 1): 0.72, ('electra', 2): 0.74,
            ('bert_mlm', 0): 0.60, ('bert_mlm', 1): 0.61, ('bert_mlm', 2): 0.62}
  workdir = str(tmp_path / 'study')
  _fake_study(workdir, scores)
  settings = pretraining_study.Settings('electra_compute', tasks=('paraphrase',))
  rows = pretraining_study.collect(settings, workdir)
  assert len(rows) == 6 * 3
  table = pretraining_study.summary_table(settings, rows)
  electra_last = next(line for line in table if line.startswith('| electra | 400 |'))
  # A pretraining metric one variant lacks is a dash in its row.
  mlm_only = [dataclasses.replace(r, pretrain={}) if r.variant == 'bert_mlm' else r for r in rows]
  assert '| — |' in next(line for line in pretraining_study.summary_table(settings, mlm_only)
                         if line.startswith('| bert_mlm | 400 |'))
  assert '0.720 ± 0.020' in electra_last and '| 3 |' in electra_last
  # ELECTRA costs more per step than the MLM encoder of the same width (its generator).
  gflops = {line.split('|')[1].strip(): float(line.split('|')[3])
            for line in table if '| 400 |' in line}
  assert gflops['electra'] > gflops['bert_mlm'] > 0
  reading = pretraining_study.reading(settings, rows)
  assert reading == ['- paraphrase: best electra (0.720), +0.110 over bert_mlm: larger than '
                     "the seeds' standard deviation (0.020)."]
  out = str(tmp_path / 'page.md')
  pretraining_study.write_report(settings, workdir, out)
  page = open(out).read()
  assert '![electra_compute](page.png)' in page and os.path.getsize(tmp_path / 'page.png') > 0
  assert 'Clark et al. 2020' in page and electra_last in page


def test_a_finished_finetune_of_another_recipe_is_refused(tmp_path):
  settings = pretraining_study.Settings('masking')
  run = tmp_path / 'static-s0' / 'finetune' / 'genre-step400'
  run.mkdir(parents=True)
  old = {**settings.finetune_recipe(), 'epochs': 0.3}
  (run / 'result.json').write_text(json.dumps({'recipe': old, 'test': {'mcc': 0.1}}))
  with pytest.raises(ValueError, match="fine-tuned with .*'epochs': 0.3"):
    pretraining_study.run_finetune(settings, str(tmp_path / 'static-s0'), 'genre', 400, 0)
  (run / 'result.json').write_text(json.dumps({'recipe': settings.finetune_recipe(),
                                               'test': {'mcc': 0.1}}))
  assert pretraining_study.run_finetune(settings, str(tmp_path / 'static-s0'), 'genre', 400,
                                        0)['test'] == {'mcc': 0.1}
