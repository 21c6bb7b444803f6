"""A frozen-feature classifier on the features studies/features.py wrote, per layer spec.

  python -m studies.feature_probe --features=W/features/paraphrase/step_N [--out=docs/x.md]

For every feature array (layer spec) of `<features>/train.npz`: standardise (statistics of
train), fit scikit-learn's LogisticRegression on train for each C of a small grid, keep the
C with the best validation accuracy (ties: the smaller C, the stronger regularisation), and
report validation and test accuracy, F1 (of class 1 for two classes, else macro) and
Matthews correlation, beside the task's trivial baseline (the training majority class;
data.tasks.baseline when the features cover whole splits). Writes a markdown table
(default `<features>/probe.md`) and the same numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np
from sklearn import linear_model
from sklearn import metrics
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

from data import tasks as tasks_lib
from studies import features as features_lib

C_GRID = (0.01, 0.1, 1.0, 10.0)
SPLITS = ('train', 'validation', 'test')


def scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
  """Accuracy, F1 (binary: of class 1; else macro over the classes present) and MCC."""
  binary = num_classes == 2
  return {
      'accuracy': float(metrics.accuracy_score(labels, predictions)),
      'f1': float(metrics.f1_score(labels, predictions, average='binary' if binary else 'macro',
                                   zero_division=0.0)),
      'mcc': float(metrics.matthews_corrcoef(labels, predictions)),
  }


def fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        c_grid: Sequence[float] = C_GRID, max_iter: int = 1000, seed: int = 0):
  """(model, C): standardised logistic regression, C picked by validation accuracy."""
  best = None
  for c in sorted(c_grid):
    model = sk_pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    model.fit(x_train, y_train)
    accuracy = metrics.accuracy_score(y_val, model.predict(x_val))
    if best is None or accuracy > best[0]:
      best = (accuracy, model, c)
  return best[1], best[2]


def baseline(task: str, labels: dict[str, np.ndarray], num_classes: int, *,
             complete: bool, data_dir: str | None = None) -> dict[str, dict[str, float]]:
  """{split: scores} of predicting the training majority class everywhere.

  With whole splits and a task of data.tasks, its own `baseline` (the figures eval.py
  prints); otherwise the same rule on the labels read, so a subset is compared with itself.
  """
  result = {}
  majority = int(np.bincount(labels['train'].astype(np.int64), minlength=num_classes).argmax())
  for split in labels:
    if split == 'train' or (labels[split] < 0).any():  # GLUE's test labels are hidden (-1)
      continue
    constant = np.full_like(labels[split], majority)
    result[split] = scores(labels[split], constant, num_classes)
    if complete and task in tasks_lib.TASKS:
      published = tasks_lib.baseline(task, split, data_dir=data_dir)
      result[split].update(accuracy=published['accuracy'], f1=published['f1'])
  return result


def probe(features_dir: str, c_grid: Sequence[float] = C_GRID) -> dict:
  """Fits and scores a probe per layer spec; the report `write` renders."""
  loaded = {}
  for split in SPLITS:
    path = os.path.join(features_dir, f'{split}.npz')
    if os.path.exists(path):
      loaded[split] = features_lib.load_npz(path)
  for needed in ('train', 'validation'):
    if needed not in loaded:
      raise FileNotFoundError(f'{features_dir}/{needed}.npz not found: the probe trains on '
                              'train and picks C on validation')
  meta = loaded['train'][1]
  for split, (_, other) in loaded.items():
    for key in ('task', 'step', 'workdir', 'pooling', 'layers'):
      if other.get(key) != meta.get(key):
        raise ValueError(f'{split}.npz has {key}={other.get(key)!r} but train.npz has '
                         f'{meta.get(key)!r}: features of different runs')
  num_classes = meta['num_classes']
  if not num_classes:
    raise ValueError(f'task {meta["task"]!r} is a regression task; the probe classifies')
  labels = {split: arrays['label'] for split, (arrays, _) in loaded.items()}
  rows = {}
  for key in features_lib.feature_keys(loaded['train'][0]):
    x = {split: arrays[key].reshape(len(arrays[key]), -1) for split, (arrays, _) in loaded.items()}
    model, c = fit(x['train'], labels['train'], x['validation'], labels['validation'], c_grid)
    rows[key] = {'C': c, 'dim': int(x['train'].shape[1]),
                 **{split: scores(labels[split], model.predict(x[split]), num_classes)
                    for split in loaded if split != 'train' and (labels[split] >= 0).all()}}
  complete = all(m['complete'] for _, m in loaded.values())
  return {
      'task': meta['task'], 'step': meta.get('step'), 'workdir': meta.get('workdir'),
      'pooling': meta['pooling'], 'num_classes': num_classes, 'features': features_dir,
      'examples': {split: int(len(labels[split])) for split in loaded},
      'complete': complete, 'c_grid': list(c_grid), 'probes': rows,
      'baseline': baseline(meta['task'], labels, num_classes, complete=complete,
                           data_dir=meta.get('data_dir')),
  }


def markdown(report: dict) -> str:
  """The report as a markdown table: one row per layer spec, then the baseline."""
  splits = [s for s in ('validation', 'test') if s in report['examples']]
  f1 = 'F1' if report['num_classes'] == 2 else 'macro-F1'
  head = ['features', 'dim', 'C'] + [f'{s} {m}' for s in splits for m in ('acc', f1, 'MCC')]

  def cells(entry: dict) -> list[str]:
    return [f'{entry[s][m]:.4f}' if s in entry else 'n/a'
            for s in splits for m in ('accuracy', 'f1', 'mcc')]

  lines = [
      f"Frozen-feature probe: task `{report['task']}`, step {report['step']} of "
      f"`{report['workdir']}`, {report['pooling']} pooling; examples "
      + ', '.join(f'{s} {n}' for s, n in report['examples'].items())
      + ('' if report['complete'] else ' (a subset of each split)') + '.',
      '',
      '| ' + ' | '.join(head) + ' |',
      '|' + '|'.join('---' if i == 0 else '---:' for i in range(len(head))) + '|',
  ]
  for key, entry in report['probes'].items():
    lines.append('| ' + ' | '.join([f'`{key}`', str(entry['dim']), f"{entry['C']:g}",
                                    *cells(entry)]) + ' |')
  lines.append('| ' + ' | '.join(['majority baseline', '', '', *cells(report['baseline'])])
               + ' |')
  lines += ['', f"Logistic regression on standardised features, C from {report['c_grid']} "
            'by validation accuracy. Features: `' + report['features'] + '`.', '']
  return '\n'.join(lines)


def _write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write(report: dict, out: str) -> tuple[str, str]:
  """Writes `out` (markdown) and the JSON beside it; returns both paths."""
  json_path = os.path.splitext(out)[0] + '.json'
  _write_text(out, markdown(report))
  _write_text(json_path, json.dumps(report, indent=2, sort_keys=True) + '\n')
  return out, json_path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--features', required=True, help='a directory studies.features wrote')
  parser.add_argument('--out', default=None, help='markdown table; default <features>/probe.md')
  parser.add_argument('--c_grid', default=','.join(map(str, C_GRID)))
  args = parser.parse_args(argv)
  report = probe(args.features, [float(c) for c in args.c_grid.split(',')])
  paths = write(report, args.out or os.path.join(args.features, 'probe.md'))
  print(markdown(report))
  print('wrote ' + ' and '.join(paths))


if __name__ == '__main__':
  main()
