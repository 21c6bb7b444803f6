"""Runs configs/bottleneck_study.py end to end and writes its page: train every variant with
every seed, translate the test split with beam search, and report BLEU overall and by
source length (Bahdanau et al. 2015, fig. 2) with parameters and training time, as a
table and a plot.

  python -m studies.bottleneck_study --workdir=workdirs/study-bottleneck
  python -m studies.bottleneck_study --workdir=... --report_only     # the page from what ran
  python -m studies.bottleneck_study --workdir=... --variants=transformer   # some models only

Layout: WORKDIR/<variant>-s<seed>/ is a training run (training/sweep.py: a finished point
holds result.json and is skipped); its test scores go to WORKDIR/<variant>-s<seed>/test.json
with the translations beside them (test_translations.tsv). Re-running resumes; every number
on the page is read from these files.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

from absl import logging
import jax
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from configs import bottleneck_study as study_config
from training import checkpoint
from training import loop
from training import sweep
from training import translation

CONFIG = 'configs/bottleneck_study.py'
TEST = 'test.json'
# Source-length buckets in words (whitespace tokens of the English source).
EDGES = (0, 10, 20, 30, 40, 50, math.inf)
TITLES = {'rnn_none': 'RNN, no attention', 'rnn_bahdanau': 'RNN + Bahdanau',
          'rnn_luong': 'RNN + Luong (general)', 'transformer': 'Transformer'}


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = len(study_config.SEEDS)
  num_steps: int = study_config.SIZE['num_steps']
  beam_size: int = 4
  max_examples: int = 0  # test pairs translated (0: all)


def bucket_of(source: str) -> int:
  words = len(source.split())
  return next(i for i in range(len(EDGES) - 1) if EDGES[i] < words <= EDGES[i + 1]) \
      if words else 0


def bucket_name(i: int) -> str:
  low, high = EDGES[i], EDGES[i + 1]
  return f'> {low}' if high == math.inf else f'{low + 1}-{high}'


def point_names(settings: Settings) -> list[str]:
  """Seed by seed: a study stopped part way holds every model at its first seeds."""
  return [f'{v}-s{s}' for s in study_config.SEEDS[:settings.seeds] for v in study_config.VARIANTS]


def points(settings: Settings) -> list[sweep.Point]:
  by_name = {p.name: p for p in sweep.points(f'{CONFIG}:num_steps={settings.num_steps}')}
  return [by_name[name] for name in point_names(settings)]


def test_scores(point: sweep.Point, workdir: str, settings: Settings) -> dict:
  """Translates the test split with the point's final checkpoint; BLEU overall and per
  bucket. Cached in test.json (keyed by the decoding settings)."""
  point_dir = os.path.join(workdir, point.name)
  path = os.path.join(point_dir, TEST)
  recipe = {'beam_size': settings.beam_size, 'max_examples': settings.max_examples,
            'steps': settings.num_steps}
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done['recipe'] == recipe:
      return done
  exp = loop.build(point.config)
  abstract, shardings = exp.abstract_state()
  mngr = checkpoint.manager(os.path.join(point_dir, 'checkpoints'), async_save=False)
  state, step = checkpoint.restore_latest(mngr, abstract, shardings, move_damaged=False)
  if step != settings.num_steps:
    raise RuntimeError(f'{point.name}: the latest checkpoint is step {step}, not '
                       f'{settings.num_steps}')
  decode = dataclasses.replace(loop.translate_settings(point.config),
                               beam_size=settings.beam_size)
  start = time.perf_counter()
  with jax.set_mesh(exp.mesh):
    report, rows = translation.evaluate(exp, state.params, 'test', decode,
                                        settings.max_examples, progress=True)
  seconds = time.perf_counter() - start
  buckets = {}
  for i in range(len(EDGES) - 1):
    members = [r for r in rows if bucket_of(r['source']) == i]
    if members:
      scored = translation.scores([r['translation'] for r in members],
                                  [r['reference'] for r in members])
      buckets[bucket_name(i)] = {'bleu': scored['bleu'], 'count': len(members)}
  result = {'recipe': recipe, 'bleu': report['bleu'], 'chrf': report['chrf'],
            'copy_bleu': report['copy_bleu'], 'examples': len(rows), 'buckets': buckets,
            'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
            'decode_seconds': seconds}
  with open(os.path.join(point_dir, 'test_translations.tsv'), 'w') as f:
    f.write('source\treference\ttranslation\n')
    for r in rows:
      f.write('\t'.join(r[k].replace('\t', ' ') for k in ('source', 'reference',
                                                          'translation')) + '\n')
  checkpoint.write_json(path, result)
  return result


def run(settings: Settings, workdir: str,
        variants: tuple[str, ...] = study_config.VARIANTS) -> None:
  """Trains and scores every unfinished point of `variants` (the page covers them all)."""
  todo = [p for p in points(settings) if p.name.rsplit('-s', 1)[0] in variants]
  for i, point in enumerate(todo, 1):
    if sweep.read_result(workdir, point.name) is None:
      print(f'[{i}/{len(todo)}] {point.name}: training', flush=True)
      result = sweep.run_point(point, workdir)
      print(f"[{i}/{len(todo)}] {point.name}: trained in {result['train_seconds']:.0f}s",
            flush=True)
    print(f'[{i}/{len(todo)}] {point.name}: test BLEU', flush=True)
    scores = test_scores(point, workdir, settings)
    print(f"[{i}/{len(todo)}] {point.name}: BLEU {scores['bleu']:.2f}", flush=True)


def collect(settings: Settings, workdir: str) -> dict[str, list[dict]]:
  """{variant: [one dict per finished seed: test scores + train seconds]}."""
  rows = {v: [] for v in study_config.VARIANTS}
  for name in point_names(settings):
    trained = sweep.read_result(workdir, name)
    path = os.path.join(workdir, name, TEST)
    if trained is None or not os.path.exists(path):
      continue
    with open(path) as f:
      scores = json.load(f)
    rows[name.rsplit('-s', 1)[0]].append({**scores, 'train_seconds': trained['train_seconds']})
  return rows


def _mean_std(values: list[float], fmt: str = '.2f') -> str:
  if not values:
    return '-'
  if len(values) == 1:
    return f'{values[0]:{fmt}}'
  return f'{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}'


def bucket_names(rows: dict[str, list[dict]]) -> list[str]:
  names = {b for seeds in rows.values() for r in seeds for b in r['buckets']}
  return [bucket_name(i) for i in range(len(EDGES) - 1) if bucket_name(i) in names]


def table(rows: dict[str, list[dict]]) -> list[str]:
  buckets = bucket_names(rows)
  counts = {b: next((r['buckets'][b]['count'] for s in rows.values() for r in s
                     if b in r['buckets']), 0) for b in buckets}
  lines = ['| model | seeds | parameters | train s | test BLEU | chrF | '
           + ' | '.join(f'BLEU {b} words ({counts[b]})' for b in buckets) + ' |',
           '|---|---|---|---|---|---|' + '---|' * len(buckets)]
  for variant, seeds in rows.items():
    if not seeds:
      continue
    per_bucket = [_mean_std([r['buckets'][b]['bleu'] for r in seeds if b in r['buckets']], '.1f')
                  for b in buckets]
    lines.append(f'| {TITLES[variant]} | {len(seeds)} | {seeds[0]["params"]:,} | '
                 f'{_mean_std([r["train_seconds"] for r in seeds], ".0f")} | '
                 f'{_mean_std([r["bleu"] for r in seeds])} | '
                 f'{_mean_std([r["chrf"] for r in seeds], ".1f")} | ' + ' | '.join(per_bucket) + ' |')
  return lines


def plot(rows: dict[str, list[dict]], out: str, num_steps: int) -> None:
  buckets = bucket_names(rows)
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for variant, seeds in rows.items():
    if not seeds:
      continue
    means, stds, xs = [], [], []
    for x, b in enumerate(buckets):
      values = [r['buckets'][b]['bleu'] for r in seeds if b in r['buckets']]
      if values:
        xs.append(x)
        means.append(statistics.mean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    ax.errorbar(xs, means, yerr=stds, marker='o', capsize=3, label=TITLES[variant])
  ax.set_xticks(range(len(buckets)), [f'{b}' for b in buckets])
  ax.set_xlabel('source sentence length (words)')
  ax.set_ylabel('test BLEU (mean ± std over seeds)')
  ax.set_title(f'English → Spanish by source length, {num_steps} training steps')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def reading(rows: dict[str, list[dict]]) -> list[str]:
  """How much each model loses from its best bucket to the longest, against the seeds'
  spread: computed, not typed."""
  buckets = bucket_names(rows)
  if len(buckets) < 2:
    return []
  lines = []
  for variant, seeds in rows.items():
    if not seeds:
      continue
    mean = lambda b: statistics.mean([r['buckets'][b]['bleu'] for r in seeds
                                      if b in r['buckets']])
    best = max(buckets, key=mean)
    longest = buckets[-1]
    spread = [r['buckets'][longest]['bleu'] for r in seeds if longest in r['buckets']]
    std = statistics.stdev(spread) if len(spread) > 1 else float('nan')
    lines.append(f'- {TITLES[variant]}: best at {best} words ({mean(best):.1f} BLEU), '
                 f'{mean(longest):.1f} at {longest} words: a drop of '
                 f'{mean(best) - mean(longest):.1f} BLEU (the seeds\' std there: {std:.1f}).')
  return lines


def partial_note(rows: dict[str, list[dict]], settings: Settings) -> list[str]:
  """A line naming the points still missing, when the study has not finished."""
  done = sum(len(seeds) for seeds in rows.values())
  expected = len(rows) * settings.seeds
  if done == expected:
    return []
  missing = ', '.join(f'{TITLES[v]} {settings.seeds - len(s)}' for v, s in rows.items()
                      if len(s) < settings.seeds)
  return [f'**Partial: {done} of {expected} runs finished** (missing seeds: {missing}); '
          're-run the command to resume, finished runs are skipped.', '']


def write_report(settings: Settings, workdir: str, out: str) -> None:
  rows = collect(settings, workdir)
  if not any(rows.values()):
    raise FileNotFoundError(f'no finished point in {workdir}: run without --report_only first')
  size = study_config.SIZE
  image = os.path.splitext(out)[0] + '.png'
  plot(rows, image, settings.num_steps)
  command = f'python -m studies.bottleneck_study --workdir={workdir}'
  if settings.num_steps != Settings.num_steps:
    command += f' --num_steps={settings.num_steps}'
  examples = next(r['examples'] for s in rows.values() for r in s)
  lines = [
      '# The bottleneck study: fixed-size context vs attention, by sentence length', '',
      f'Command: `{command}`', '',
      ('Question (Bahdanau et al. 2015, fig. 2): does an encoder-decoder whose only bridge is '
       "the encoder's final state translate long sentences worse, and does attention remove "
       'that?'), '',
      (f'Setup: bible/en_es (English → Spanish verses), a joint {size["vocab_size"]}-piece '
       f'BPE vocabulary, rows of {size["seq_len"]} tokens each side (longer verses cut), '
       f'batch {size["batch_size"]}, {settings.num_steps} steps for every model (equal '
       f'steps, the same batches for a seed), Adam with {size["warmup_steps"]} warmup steps '
       f'and inverse square-root decay from {size["learning_rate"]}, label smoothing 0.1. '
       f'RNNs: a bidirectional LSTM encoder and an LSTM decoder, {size["width"]} wide, '
       'one layer each, dropout 0.1, shared embeddings; the Transformer: 2 + 2 post-LN '
       f'layers, width {size["width"]}, 4 heads, MLP {2 * size["width"]}. Test: '
       f'{examples} verses, beam {settings.beam_size}, GNMT length penalty 0.6, sacrebleu '
       'BLEU on the detokenised outputs; buckets by the English source\'s word count '
       '(verses in each in parentheses). Seeds change the initialisation and the batch '
       'order.'), '',
      *partial_note(rows, settings),
      *table(rows), '',
      f'![BLEU by source length]({os.path.basename(image)})', '',
      '## Reading (computed from the table)', '', *reading(rows), '',
      ('Scale: this is a small corpus (27k verse pairs) and short training, on 2 CPU cores; '
       'absolute BLEU is far below the papers\' WMT numbers, and the longest bucket holds '
       'few verses. The comparison is between models at equal steps on the same data.'), '',
  ]
  with open(out, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(table(rows)))
  print(f'wrote {out} and {image}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='docs/study_bottleneck.md')
  parser.add_argument('--seeds', type=int, default=Settings.seeds)
  parser.add_argument('--num_steps', type=int, default=Settings.num_steps)
  parser.add_argument('--beam_size', type=int, default=Settings.beam_size)
  parser.add_argument('--max_examples', type=int, default=Settings.max_examples)
  parser.add_argument('--report_only', action='store_true')
  parser.add_argument('--variants', default=','.join(study_config.VARIANTS),
                      help='run only these models (comma-separated); the page shows every '
                           'finished run')
  args = parser.parse_args(argv)
  variants = tuple(args.variants.split(','))
  if not set(variants) <= set(study_config.VARIANTS):
    parser.error(f'--variants must name some of {", ".join(study_config.VARIANTS)}')
  logging.set_verbosity(logging.WARNING)
  settings = Settings(seeds=args.seeds, num_steps=args.num_steps, beam_size=args.beam_size,
                      max_examples=args.max_examples)
  if not args.report_only:
    run(settings, args.workdir, variants)
  write_report(settings, args.workdir, args.out)


if __name__ == '__main__':
  main()
