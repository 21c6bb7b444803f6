"""studies/encoder_report.py reads every number from the runs' files."""

import json
import os

from studies import encoder_report


def _run(root, name, config, records=(), evals=None):
  workdir = os.path.join(root, name)
  os.makedirs(os.path.join(workdir, 'eval'))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  for step, results in (evals or {}).items():
    with open(os.path.join(workdir, 'eval', f'step_{step}.json'), 'w') as f:
      json.dump({'step': step, 'results': results}, f)
  return workdir


def test_report_tables_the_runs_own_numbers(tmp_path):
  pretrain_config = {
      'objective': 'bert_pretraining', 'train': {'num_steps': 4},
      'optimizer': {'learning_rate': 0.001},
      'model': {'num_layers': 2, 'embed_dim': 32, 'num_heads': 2, 'mlp_dim': 64},
      'data': {'task': 'nsp', 'vocab_size': 512, 'tokenizer': 'wordpiece', 'batch_size': 8,
               'seq_len': 32}}
  records = [{'step': s, 'split': split, 'time': 100.0 + 30 * s, 'loss': 7.0 - s / 10,
              'mlm_loss': 6.0 - s / 7, 'mlm_accuracy': 0.01 * s, 'mlm_perplexity': 400.0 - s,
              'nsp_accuracy': 0.5 + s / 100} for s in (2, 4) for split in ('train', 'validation')]
  pretrain = _run(tmp_path, 'bert', pretrain_config, records)
  finetune = _run(tmp_path, 'para', {'data': {'task': 'paraphrase'}}, evals={
      3: {'validation': {'accuracy': 0.61234, 'f1': 0.7, 'mcc': 0.25}},
      9: {'validation': {'accuracy': 0.87654, 'f1': 0.88, 'mcc': 0.75}}})
  out = str(tmp_path / 'encoders.md')
  encoder_report.write(out, pretrain, {'from BERT': finetune}, None, 'test')
  text = open(out).read()
  assert '| 4 | 6.6000 | 5.4286 | 0.0400 | 396.0000 | 0.5400 |' in text
  assert '1.0 min from the first logged step' in text
  assert f'| from BERT (`{finetune}`, step 9) | validation | 0.8765 | 0.8800 | 0.7500 |' in text
  assert '| majority baseline | validation |' in text
  assert os.path.exists(tmp_path / 'encoders_pretraining.png')
