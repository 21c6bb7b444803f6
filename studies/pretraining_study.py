"""Runs one of configs/pretraining_studies.py's studies end to end and writes its page:
pretrain every variant with every seed, fine-tune each pretrained model on the corpus tasks,
evaluate on the test split, and report mean ± std over seeds as a table and a plot.

  python -m studies.pretraining_study --study=masking --workdir=workdirs/study-masking
  python -m studies.pretraining_study --study=generator_size --workdir=... --seeds=3
  python -m studies.pretraining_study --study=nsp --workdir=... --report_only

Layout: WORKDIR/<variant>-s<seed>/ is a pretraining run (training/sweep.py: a finished
point holds result.json and is skipped), WORKDIR/<variant>-s<seed>/finetune/<task>-step<k>/
a fine-tuning run from its checkpoint at step k, finished when its result.json holds the
test scores. Re-running the command resumes where it stopped; `--report_only` writes the
page from what has finished. Every number on the page is read from these files.
"""

import argparse
import collections
import dataclasses
import importlib
import json
import os
import statistics
import time

from absl import logging
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import tqdm

from configs import bert_finetune
from configs import pretraining_studies as studies_config
from data import tasks as tasks_lib
from studies import flops as flops_lib
from training import checkpoint
from training import loop
from training import sweep

CONFIG = 'configs/pretraining_studies.py'
RESULT = 'result.json'
# Pretraining metrics shown beside the fine-tuned scores (those a run reports).
PRETRAIN_METRICS = ('mlm_accuracy', 'nsp_accuracy', 'rtd_accuracy')
FINETUNE_METRIC = 'mcc'  # Matthews correlation: 0 at chance for any class balance


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one invocation runs: the study, its seeds and steps, the fine-tuning recipe."""
  study: str
  seeds: int = len(studies_config.SEEDS)
  num_steps: int = studies_config.SIZE['num_steps']
  tasks: tuple[str, ...] = studies_config.FINETUNE['tasks']
  epochs: float = studies_config.FINETUNE['epochs']
  batch_size: int = studies_config.FINETUNE['batch_size']
  learning_rate: float = studies_config.FINETUNE['learning_rate']

  @property
  def sweep_arg(self) -> str:
    return f'study={self.study},seeds={self.seeds},num_steps={self.num_steps}'

  def finetune_recipe(self) -> dict:
    return {'epochs': self.epochs, 'batch_size': self.batch_size,
            'learning_rate': self.learning_rate}

  def curve_steps(self) -> tuple[int, ...]:
    """The pretraining steps fine-tuned from: the last, or a curve's fractions of it."""
    fractions = studies_config.CURVE_FRACTIONS.get(self.study, (1.0,))
    return tuple(max(1, round(f * self.num_steps)) for f in fractions)


def variant_and_seed(point: str) -> tuple[str, int]:
  variant, _, seed = point.rpartition('-s')
  return variant, int(seed)


# ------------------------------------------------------------------------------ running


def finetune_config(settings: Settings, pretrained_dir: str, task: str, step: int, seed: int):
  config = bert_finetune.get_config(
      f'task={task},init_from={pretrained_dir},init_step={step},epochs={settings.epochs},'
      f'batch_size={settings.batch_size},learning_rate={settings.learning_rate},seed={seed}')
  config.unlock()
  steps = config.train.num_steps
  # Evaluate and save once, at the end: the test split is what the study reads.
  config.train.update(eval_every=steps, checkpoint_every=steps, keep_checkpoints=1,
                      log_every=max(1, steps // 20))
  config.data.seed = seed
  config.lock()
  return config


def run_finetune(settings: Settings, pretrained_dir: str, task: str, step: int,
                 seed: int) -> dict:
  """Fine-tunes from `pretrained_dir` at `step` on `task` (resuming) and scores the test
  split; returns the run's result.json."""
  run_dir = os.path.join(pretrained_dir, 'finetune', f'{task}-step{step}')
  path = os.path.join(run_dir, RESULT)
  recipe = settings.finetune_recipe()
  if os.path.exists(path):
    result = checkpoint.read_json(path)
    if result.get('recipe') != recipe:
      raise ValueError(f'{run_dir} was fine-tuned with {result.get("recipe")}, not {recipe}: '
                       'delete it (or use another --workdir) to fine-tune with the new recipe')
    return result
  config = finetune_config(settings, pretrained_dir, task, step, seed)
  start = time.perf_counter()
  validation = loop.train_and_evaluate(config, run_dir)
  seconds = time.perf_counter() - start
  evaluator = importlib.import_module('eval').Evaluator(run_dir)
  final = config.train.num_steps
  if evaluator.mngr.latest_step() != final:
    raise RuntimeError(f'{run_dir} stopped before step {final}; re-run to resume')
  test = evaluator.evaluate(final, splits=('test',))['test']
  evaluator.mngr.close()
  result = {'task': task, 'pretrained_step': step, 'seed': seed, 'steps': final,
            'recipe': recipe, 'train_seconds': seconds, 'validation': validation, 'test': test}
  checkpoint.write_json(path, result)
  return checkpoint.read_json(path)


def run(settings: Settings, workdir: str) -> None:
  """Pretrains every point, then fine-tunes each on every task (skipping finished work)."""
  points = sweep.points(f'{CONFIG}:{settings.sweep_arg}')
  sweep.run(points, workdir)
  jobs = [(p.name, task, step) for p in points for step in settings.curve_steps()
          for task in settings.tasks]
  for name, task, step in tqdm.tqdm(jobs, desc='fine-tuning', unit='run'):
    _, seed = variant_and_seed(name)
    run_finetune(settings, os.path.join(workdir, name), task, step, seed)


# ------------------------------------------------------------------------------ report


@dataclasses.dataclass(frozen=True)
class Row:
  """One finished fine-tuning run with what its pretraining run measured."""
  variant: str
  seed: int
  step: int
  task: str
  score: float
  pretrain_flops: float
  pretrain: dict
  pretrain_seconds: float


def collect(settings: Settings, workdir: str) -> list[Row]:
  rows = []
  for name in sweep_point_names(settings):
    pretrained = sweep.read_result(workdir, name)
    if pretrained is None:
      continue
    config = pretrained['config']
    per_token = flops_lib.pretraining_flops_per_token(
        config['model_name'], config['model'], config['data']['seq_len'])
    tokens_per_step = config['data']['batch_size'] * config['data']['seq_len']
    variant, seed = variant_and_seed(name)
    for step in settings.curve_steps():
      for task in settings.tasks:
        path = os.path.join(workdir, name, 'finetune', f'{task}-step{step}', RESULT)
        if not os.path.exists(path):
          continue
        result = checkpoint.read_json(path)
        rows.append(Row(variant, seed, step, task, result['test'][FINETUNE_METRIC],
                        float(per_token) * tokens_per_step * step, pretrained['validation'],
                        pretrained['train_seconds']))
  return rows


def sweep_point_names(settings: Settings) -> list[str]:
  return list(studies_config.sweep(settings.sweep_arg))


def _mean_std(values: list[float]) -> str:
  if not values:
    return '—'
  std = statistics.stdev(values) if len(values) > 1 else float('nan')
  return f'{statistics.mean(values):.3f} ± {std:.3f}'


def summary_table(settings: Settings, rows: list[Row]) -> list[str]:
  """Variant (and step) by task: test accuracy mean ± std over seeds, pretraining metrics."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r.variant, r.step)].append(r)
  pretrain_names = [m for m in PRETRAIN_METRICS if any(m in r.pretrain for r in rows)]
  header = (['variant', 'step', 'pretraining GFLOPs', 'pretrain min']
            + [f'val {m}' for m in pretrain_names]
            + [f'{task} test {FINETUNE_METRIC}' for task in settings.tasks] + ['seeds'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  order = list(dict.fromkeys(variant_and_seed(n)[0] for n in sweep_point_names(settings)))
  for variant in order:
    for step in settings.curve_steps():
      group = groups.get((variant, step))
      if not group:
        continue
      by_seed = {r.seed: r for r in group}
      # A metric some variants lack (NSP accuracy without NSP) shows as '—' for them.
      pretrain = [_mean_std([r.pretrain[m] for r in by_seed.values() if m in r.pretrain])
                  for m in pretrain_names]
      scores = [_mean_std([r.score for r in group if r.task == task]) for task in settings.tasks]
      minutes = statistics.mean(r.pretrain_seconds for r in by_seed.values()) / 60
      lines.append('| ' + ' | '.join(
          [variant, str(step), f'{group[0].pretrain_flops / 1e9:.0f}', f'{minutes:.1f}']
          + pretrain + scores + [str(len(by_seed))]) + ' |')
  return lines


def plot(settings: Settings, rows: list[Row], out: str) -> None:
  """Fine-tuned score per task: against pretraining FLOPs for a curve study, else bars."""
  fig, axes = plt.subplots(1, len(settings.tasks), figsize=(5 * len(settings.tasks), 3.6),
                           squeeze=False)
  variants = list(dict.fromkeys(r.variant for r in rows))
  for ax, task in zip(axes[0], settings.tasks):
    for i, variant in enumerate(variants):
      points = collections.defaultdict(list)
      for r in rows:
        if r.task == task and r.variant == variant:
          points[(r.pretrain_flops, r.step)].append(r.score)
      keys = sorted(points)
      means = [statistics.mean(points[k]) for k in keys]
      stds = [statistics.stdev(points[k]) if len(points[k]) > 1 else 0.0 for k in keys]
      if len(settings.curve_steps()) > 1:
        ax.errorbar([k[0] / 1e9 for k in keys], means, yerr=stds, marker='o', capsize=3,
                    label=variant)
      elif keys:  # named by the x ticks
        ax.bar(i, means[0], yerr=stds[0], capsize=4, color=f'C{i}')
    if len(settings.curve_steps()) > 1:
      ax.set_xlabel('pretraining GFLOPs')
    else:
      ax.set_xticks(range(len(variants)), variants, rotation=20, fontsize=8)
    ax.axhline(0.0, color='grey', linestyle=':', label='chance (a constant prediction)')
    ax.set_title(f'{task}: test {FINETUNE_METRIC} (mean ± std over seeds)', fontsize=9)
    ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def reading(settings: Settings, rows: list[Row]) -> list[str]:
  """What the numbers say, computed: per task, the best variant (at the last step) and
  whether its lead over the runner-up exceeds the seeds' spread."""
  lines = []
  last = settings.curve_steps()[-1]
  for task in settings.tasks:
    by_variant = collections.defaultdict(list)
    for r in rows:
      if r.task == task and r.step == last:
        by_variant[r.variant].append(r.score)
    ranked = sorted(by_variant.items(), key=lambda kv: -statistics.mean(kv[1]))
    if len(ranked) < 2:
      continue
    (best, a), (second, b) = ranked[:2]
    lead = statistics.mean(a) - statistics.mean(b)
    spread = max((statistics.stdev(v) for v in (a, b) if len(v) > 1), default=float('nan'))
    verdict = ('larger than' if lead > spread else 'within') + ' the seeds\' standard deviation'
    lines.append(f'- {task}: best {best} ({statistics.mean(a):.3f}), {lead:+.3f} over '
                 f'{second}: {verdict} ({spread:.3f}).')
  return lines


def tokens_note(settings: Settings) -> str:
  size = studies_config.SIZE
  tokens = settings.num_steps * size['batch_size'] * size['seq_len']
  return (f'Scale: each run pretrains on {tokens / 1e6:.2f}M tokens (BERT-Base saw ~131,000M, '
          'ELECTRA-Small ~16,000M): a difference smaller than the seeds\' spread here says '
          'the question needs more compute than this machine gives it, not that the '
          'variants are equal.')


def rtd_reading(rows: list[Row]) -> list[str]:
  """ELECTRA runs: how far the discriminator got past calling every token original (whose
  accuracy is 1 − the replaced fraction), at the last pretraining step."""
  lines = []
  for variant in dict.fromkeys(r.variant for r in rows):
    runs = {r.seed: r.pretrain for r in rows
            if r.variant == variant and 'rtd_accuracy' in r.pretrain}
    if not runs:
      continue
    gain = [p['rtd_accuracy'] - (1 - p['replaced_fraction']) for p in runs.values()]
    recall = [p['rtd_recall'] for p in runs.values()]
    lines.append(f'- {variant}: RTD accuracy {statistics.mean(gain):+.4f} over calling every '
                 f'token original; recall of replaced tokens {statistics.mean(recall):.3f}.')
  return lines


def write_report(settings: Settings, workdir: str, out: str) -> None:
  rows = collect(settings, workdir)
  if not rows:
    raise FileNotFoundError(f'{workdir}: no finished fine-tuning runs of study '
                            f'{settings.study!r} yet')
  image = os.path.splitext(out)[0] + '.png'
  plot(settings, rows, image)
  size = studies_config.SIZE
  lines = [f'# Pretraining study: {settings.study}', '',
           f'Written by `python -m studies.pretraining_study --study={settings.study} '
           f'--workdir={workdir}` from the runs\' own files; re-running resumes and rewrites.',
           '', studies_config.QUESTIONS[settings.study], '',
           f'Pretraining: {size["num_layers"]} layers, width {size["embed_dim"]}, '
           f'{size["num_heads"]} heads, MLP {size["mlp_dim"]}, rows of {size["seq_len"]} tokens, '
           f'batch {size["batch_size"]}, vocabulary {size["vocab_size"]}, '
           f'{settings.num_steps} steps, seeds {list(studies_config.SEEDS[:settings.seeds])}. '
           f'Fine-tuning: {settings.epochs} epoch(s) of each task\'s training split, batch '
           f'{settings.batch_size}, peak learning rate {settings.learning_rate}; scores are '
           f'{FINETUNE_METRIC} on the test split (examples from books no training split holds).',
           '', 'Variants (arguments of `configs/pretraining_studies.py`, whose docstring '
           'describes the families):', '',
           *[f'- `{variant}`: `{arg}`'
             for variant, arg in studies_config.STUDIES[settings.study].items()],
           '', 'FLOPs: ' + ' '.join(flops_lib.__doc__.split('\n\n')[1].split()), '',
           'Wall times ("pretrain min") are of a CPU shared with other work: compare FLOPs.', '',
           *summary_table(settings, rows), '', f'![{settings.study}]({os.path.basename(image)})',
           '', 'A constant prediction (the majority class) scores MCC 0; the test accuracy '
           'of that baseline: ' + ', '.join(
               f'{t} {tasks_lib.baseline(t, "test")["accuracy"]:.3f}' for t in settings.tasks)
           + '.',
           '', '## What the numbers say', '', *reading(settings, rows), *rtd_reading(rows),
           '', tokens_note(settings), '']
  with open(out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'wrote {out} and {image}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--study', required=True, choices=sorted(studies_config.STUDIES))
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', help='the page to write (default docs/study_<study>.md)')
  parser.add_argument('--seeds', type=int, default=len(studies_config.SEEDS))
  parser.add_argument('--num_steps', type=int, default=studies_config.SIZE['num_steps'])
  parser.add_argument('--tasks', default=','.join(studies_config.FINETUNE['tasks']))
  parser.add_argument('--epochs', type=float, default=studies_config.FINETUNE['epochs'])
  parser.add_argument('--learning_rate', type=float,
                      default=studies_config.FINETUNE['learning_rate'])
  parser.add_argument('--report_only', action='store_true')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  settings = Settings(args.study, seeds=args.seeds, num_steps=args.num_steps,
                      tasks=tuple(filter(None, args.tasks.split(','))), epochs=args.epochs,
                      learning_rate=args.learning_rate)
  if not args.report_only:
    run(settings, args.workdir)
  write_report(settings, args.workdir, args.out or f'docs/study_{args.study}.md')


if __name__ == '__main__':
  main()
