"""Plots a run's metrics.jsonl: training and validation loss against step.

  python -m training.plot --workdir=workdirs/demo --out=docs/demo_loss.png
"""

import argparse
import collections

import matplotlib
matplotlib.use('Agg')  # files only; no display on training machines
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from training import metrics as metrics_lib


def curves(records: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
  """{split: (steps, values)} for one metric, the last record winning on repeated steps."""
  by_split = collections.defaultdict(dict)
  for r in records:
    if metric in r:
      by_split[r['split']][r['step']] = r[metric]
  return {split: (sorted(v), [v[s] for s in sorted(v)]) for split, v in by_split.items()}


def plot(workdir: str, out: str, metric: str = 'loss', title: str | None = None) -> None:
  records = metrics_lib.read_metrics(workdir)
  if not records:
    raise FileNotFoundError(f'{workdir}/metrics.jsonl is missing or empty')
  fig, ax = plt.subplots(figsize=(6, 4))
  for split, (steps, values) in sorted(curves(records, metric).items()):
    ax.plot(steps, values, marker='o' if split != 'train' else None, label=split)
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  ax.set_title(title or workdir)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f'wrote {out}')


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--metric', default='loss')
  parser.add_argument('--title', default=None)
  args = parser.parse_args()
  plot(args.workdir, args.out, args.metric, args.title)


if __name__ == '__main__':
  main()
