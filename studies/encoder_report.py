"""Writes docs/encoders.md from finished runs: pretraining curves, fine-tuning against the
trivial baseline, and the frozen-feature probe.

  python -m studies.encoder_report --pretrain=workdirs/bert \\
      --finetune="from BERT=workdirs/bert-paraphrase,from scratch=workdirs/scratch-paraphrase" \\
      --probe=workdirs/bert/features/paraphrase/step_2000/probe.json --out=docs/encoders.md

Every number is read from the runs' own files (metrics.jsonl, eval/step_<N>.json, the
probe's JSON, wall times from metrics.jsonl's timestamps where present); nothing is typed
by hand.
"""

import argparse
import json
import os
import sys

from data import pipeline
from data import tasks
from studies import feature_probe
from training import metrics
from training import plot


def _config(workdir: str) -> dict:
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)


def pretraining_section(workdir: str, out_dir: str) -> list[str]:
  """The validation metrics at every evaluation of a pretraining run, and its loss plot."""
  config = _config(workdir)
  records = [r for r in metrics.read_metrics(workdir) if r['split'] == 'validation']
  if not records:
    raise ValueError(f'{workdir}: no validation records in metrics.jsonl')
  names = [n for n in ('loss', 'mlm_loss', 'mlm_accuracy', 'mlm_perplexity', 'nsp_accuracy')
           if n in records[-1]]
  model, data = config['model'], config['data']
  logged = [r['time'] for r in metrics.read_metrics(workdir) if 'time' in r]
  minutes = (max(logged) - min(logged)) / 60 if logged else float('nan')
  lines = [
      f"## Pretraining: `{workdir}` ({config['objective']}, task `{data['task']}`)", '',
      f"{model['num_layers']} layers, width {model['embed_dim']}, {model['num_heads']} heads, "
      f"MLP {model['mlp_dim']}, vocabulary {data['vocab_size']} ({data['tokenizer']}), "
      f"batch {data['batch_size']} × {data['seq_len']}, {config['train']['num_steps']} steps, "
      f"peak lr {config['optimizer']['learning_rate']}; {minutes:.1f} min from the first "
      'logged step to the last.', '',
      '| step | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  lines += [f"| {r['step']} | " + ' | '.join(f'{r[n]:.4f}' for n in names) + ' |'
            for r in records]
  image = os.path.join(out_dir, 'encoders_pretraining.png')
  metric = 'mlm_loss' if 'mlm_loss' in records[-1] else 'loss'
  plot.plot(workdir, image, metric=metric, title=f'{workdir}: {metric}')
  lines += ['', f'![{metric}]({os.path.basename(image)})', '']
  return lines


def _final_eval(workdir: str) -> tuple[int, dict]:
  directory = os.path.join(workdir, 'eval')
  steps = sorted(int(n[len('step_'):-len('.json')]) for n in os.listdir(directory)
                 if n.startswith('step_') and n.endswith('.json'))
  if not steps:
    raise FileNotFoundError(f'{directory}: no eval/step_<N>.json; run eval.py first')
  with open(os.path.join(directory, f'step_{steps[-1]}.json')) as f:
    return steps[-1], json.load(f)['results']


def finetune_section(runs: dict[str, str]) -> list[str]:
  """One row per fine-tuning run and split, and the task's majority baseline."""
  lines, task_name = [], None
  rows = []
  for label, workdir in runs.items():
    config = _config(workdir)
    task_name = task_name or config['data']['task']
    if config['data']['task'] != task_name:
      raise ValueError(f'{workdir} fine-tunes {config["data"]["task"]!r}, not {task_name!r}')
    step, results = _final_eval(workdir)
    for split, report in results.items():
      rows.append((f'{label} (`{workdir}`, step {step})', split, report))
  data_dir = pipeline.data_dir(pipeline.DataConfig())
  for split in ('validation', 'test'):
    rows.append(('majority baseline', split, tasks.baseline(task_name, split, data_dir=data_dir)))
  names = ['accuracy', 'f1', 'mcc']
  lines += [f'## Fine-tuning on `{task_name}`', '',
            '| run | split | ' + ' | '.join(names) + ' |', '|---|---|' + '---|' * len(names)]
  for label, split, report in rows:
    cells = (f'{report[n]:.4f}' if n in report else '' for n in names)
    lines.append(f'| {label} | {split} | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def probe_section(path: str) -> list[str]:
  with open(path) as f:
    report = json.load(f)
  return ['## Frozen features against fine-tuning', '', feature_probe.markdown(report), '']


def write(out: str, pretrain: str | None, finetune: dict[str, str], probe: str | None,
          command: str) -> None:
  out_dir = os.path.dirname(os.path.abspath(out))
  lines = ['# Encoders: BERT pretraining, fine-tuning and frozen features', '',
           f'Written by `{command}` from the runs named below; machine: '
           f'{metrics.describe_machine()}.', '']
  if pretrain:
    lines += pretraining_section(pretrain, out_dir)
  if finetune:
    lines += finetune_section(finetune)
  if probe:
    lines += probe_section(probe)
  tmp = f'{out}.tmp'
  with open(tmp, 'w') as f:
    f.write('\n'.join(lines))
  os.replace(tmp, out)
  print(f'wrote {out}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pretrain', default='')
  parser.add_argument('--finetune', default='', help='label=workdir,label=workdir,...')
  parser.add_argument('--probe', default='', help="the feature probe's JSON")
  parser.add_argument('--out', default='docs/encoders.md')
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  finetune = dict(item.split('=', 1) for item in filter(None, args.finetune.split(',')))
  write(args.out, args.pretrain or None, finetune, args.probe or None,
        'python -m studies.encoder_report ' + ' '.join(argv))


if __name__ == '__main__':
  main()
