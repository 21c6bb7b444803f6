"""The two encoder-decoder pretraining comparisons of issue 13, end to end: pretrain each
variant with each seed, fine-tune every pretrained model on the same downstream generation
task, score the test split, and write the page (table + plot).

  python -m studies.denoising_study --study=bart --workdir=workdirs/study-bart
  python -m studies.denoising_study --study=t5 --workdir=workdirs/study-t5
  python -m studies.denoising_study --study=t5 --workdir=... --report_only
  python -m studies.denoising_study --study=bart --workdir=... --variants=infill,infill_permute

- bart: BART's noising functions (Lewis et al. 2020, table 1) each alone, and text infilling
  + sentence permutation (the recipe the paper keeps); configs/bart.py at size=study.
- t5: T5's objectives (Raffel et al. 2020, table 4): prefix LM, BERT-style MLM denoising,
  span corruption, at equal steps and batch; configs/t5.py (v1.1) at size=study.
Both also fine-tune the same model from a random initialisation ('none'): what pretraining
brings at all. The downstream task is `modernize` (KJV -> WEB verses, data/text_to_text.py)
through configs/text_to_text.py, with the same steps and recipe for every variant;
test: beam search on the first `max_examples` test verses, BLEU / chrF / ROUGE-L.

Layout: WORKDIR/<variant>-s<seed>/pretrain and .../finetune are training runs
(training/sweep.py: a finished run holds result.json and is skipped, an interrupted one
resumes); .../test.json holds the test scores, keyed by the settings that made them. Every
number on the page is read from these files.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

from absl import logging
import jax
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from configs import bart as bart_config
from configs import t5 as t5_config
from configs import text_to_text as text_to_text_config
from training import checkpoint
from training import loop
from training import sweep
from training import translation

SEEDS = (0, 1, 2)
TASK = 'modernize'
TEST = 'test.json'
# variant -> the pretraining config's argument (None: no pretraining).
STUDIES = {
    'bart': {
        'none': None,
        'mask': 'noising=mask=0.3',
        'delete': 'noising=delete=0.3',
        'infill': 'noising=infill=0.3',
        'permute': 'noising=permute',
        'rotate': 'noising=rotate',
        'infill_permute': 'noising=infill=0.3+permute',
    },
    't5': {
        'none': None,
        'prefix_lm': 'objective=prefix_lm',
        'mlm_denoising': 'objective=mlm_denoising',
        'span_corruption': 'objective=span_corruption',
    },
}
TITLES = {'none': 'no pretraining', 'mask': 'token masking', 'delete': 'token deletion',
          'infill': 'text infilling', 'permute': 'sentence permutation',
          'rotate': 'document rotation', 'infill_permute': 'infilling + permutation',
          'prefix_lm': 'prefix LM', 'mlm_denoising': 'BERT-style denoising',
          'span_corruption': 'span corruption'}
METRICS = ('bleu', 'chrf', 'rougeL')


@dataclasses.dataclass(frozen=True)
class Settings:
  study: str = 't5'
  seeds: int = len(SEEDS)
  pretrain_steps: int = 200
  finetune_steps: int = 200
  beam_size: int = 4
  max_examples: int = 200  # test verses scored (0: all)


def _family(study: str):
  return {'bart': bart_config, 't5': t5_config}[study]


def pretrain_config(settings: Settings, variant: str, seed: int):
  """The variant's pretraining config (the study's size, its seed, its steps)."""
  arg = STUDIES[settings.study][variant] or ''
  config = _family(settings.study).get_config(f'size=study,{arg}'.rstrip(','))
  steps = settings.pretrain_steps
  config.unlock()
  config.seed = seed
  config.data.seed = seed
  config.train.update(num_steps=steps, log_every=max(1, steps // 50),
                      eval_every=steps, checkpoint_every=steps)
  config.lock()
  return config


def finetune_config(settings: Settings, variant: str, seed: int, workdir: str):
  """Fine-tuning on TASK from the variant's pretraining run (or, 'none', the same model
  and tokenizer from a random initialisation)."""
  pretrain_dir = os.path.join(workdir, f'{variant}-s{seed}', 'pretrain')
  if STUDIES[settings.study][variant] is None:
    # The architecture and tokenizer without weights: the family's config.json alone.
    os.makedirs(pretrain_dir, exist_ok=True)
    checkpoint.write_json(os.path.join(pretrain_dir, 'config.json'),
                          pretrain_config(settings, variant, seed).to_dict())
  steps = settings.finetune_steps
  config = text_to_text_config.get_config(
      f'init_from={pretrain_dir},mixture={TASK},steps={steps},seed={seed},size=small')
  config.unlock()
  if STUDIES[settings.study][variant] is None:
    config.train.init_from = ''
  config.translate.eval_examples = 0  # scored once, on test, below
  config.train.update(eval_every=steps, checkpoint_every=steps, eval_batches=20)
  config.lock()
  return config


def test_scores(settings: Settings, config, run_dir: str) -> dict:
  """Beam search on the first max_examples test examples of TASK; cached in test.json."""
  path = os.path.join(os.path.dirname(run_dir), TEST)
  recipe = {'beam_size': settings.beam_size, 'max_examples': settings.max_examples,
            'pretrain_steps': settings.pretrain_steps,
            'finetune_steps': settings.finetune_steps}
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done['recipe'] == recipe:
      return done
  exp = loop.build(config)
  abstract, shardings = exp.abstract_state()
  mngr = checkpoint.manager(os.path.join(run_dir, 'checkpoints'), async_save=False)
  state, step = checkpoint.restore_latest(mngr, abstract, shardings, move_damaged=False)
  if step != settings.finetune_steps:
    raise RuntimeError(f'{run_dir}: the latest checkpoint is step {step}, not '
                       f'{settings.finetune_steps}')
  decode = dataclasses.replace(loop.translate_settings(config), beam_size=settings.beam_size)
  start = time.perf_counter()
  with jax.set_mesh(exp.mesh):
    report, rows = translation.evaluate(exp, state.params, 'test', decode,
                                        settings.max_examples, progress=True)
  result = {'recipe': recipe, 'decode_seconds': time.perf_counter() - start,
            **{k.split('/', 1)[1]: v for k, v in report.items()}}
  with open(os.path.join(os.path.dirname(run_dir), 'test_outputs.tsv'), 'w') as f:
    f.write('source\treference\toutput\n')
    for r in rows:
      f.write('\t'.join(r[k].replace('\t', ' ') for k in ('source', 'reference',
                                                          'translation')) + '\n')
  checkpoint.write_json(path, result)
  return result


def point_names(settings: Settings, variants=None) -> list[tuple[str, int]]:
  """(variant, seed) pairs, seed by seed: an interrupted study has every variant at the
  same number of seeds."""
  return [(v, s) for s in SEEDS[:settings.seeds] for v in (variants or STUDIES[settings.study])]


def run(settings: Settings, workdir: str, variants=None) -> None:
  """Pretrains, fine-tunes and scores every unfinished point of `variants`."""
  todo = point_names(settings, variants)
  for i, (variant, seed) in enumerate(todo, 1):
    name = f'{variant}-s{seed}'
    tag = f'[{i}/{len(todo)}] {name}'
    if STUDIES[settings.study][variant] is not None:
      pretrain = sweep.Point(f'{name}/pretrain', pretrain_config(settings, variant, seed))
      if sweep.read_result(workdir, pretrain.name) is None:
        print(f'{tag}: pretraining', flush=True)
        sweep.run_point(pretrain, workdir)
    finetune = sweep.Point(f'{name}/finetune',
                           finetune_config(settings, variant, seed, workdir))
    if sweep.read_result(workdir, finetune.name) is None:
      print(f'{tag}: fine-tuning on {TASK}', flush=True)
      sweep.run_point(finetune, workdir)
    scores = test_scores(settings, finetune.config, os.path.join(workdir, finetune.name))
    print(f"{tag}: test BLEU {scores['bleu']:.2f}", flush=True)


def collect(settings: Settings, workdir: str) -> dict[str, list[dict]]:
  """{variant: [one dict per finished seed: test scores, losses, seconds]}."""
  rows = {v: [] for v in STUDIES[settings.study]}
  for variant, seed in point_names(settings):
    name = f'{variant}-s{seed}'
    path = os.path.join(workdir, name, TEST)
    finetuned = sweep.read_result(workdir, f'{name}/finetune')
    if finetuned is None or not os.path.exists(path):
      continue
    with open(path) as f:
      row = json.load(f)
    pretrained = sweep.read_result(workdir, f'{name}/pretrain')
    row['seed'] = seed
    row['pretrain_seconds'] = pretrained['train_seconds'] if pretrained else 0.0
    row['pretrain_loss'] = pretrained['validation']['loss'] if pretrained else float('nan')
    row['finetune_seconds'] = finetuned['train_seconds']
    row['finetune_loss'] = finetuned['validation']['loss']
    rows[variant].append(row)
  return rows


def mean_std(values: list[float], fmt: str = '.2f') -> str:
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:{fmt}}'
  return f'{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}'


def table(rows: dict[str, list[dict]]) -> list[str]:
  lines = ['| pretraining | seeds | test BLEU | chrF | ROUGE-L | fine-tune val. loss | '
           'pretrain val. loss | pretrain s | fine-tune s |',
           '|---|---|---|---|---|---|---|---|---|']
  for variant, runs in rows.items():
    if not runs:
      continue
    get = lambda key: [r[key] for r in runs]  # pylint: disable=cell-var-from-loop
    pretrain_loss = [x for x in get('pretrain_loss') if x == x]  # NaN: no pretraining
    lines.append(
        f'| {TITLES[variant]} | {len(runs)} | {mean_std(get("bleu"))} | '
        f'{mean_std(get("chrf"))} | {mean_std(get("rougeL"))} | '
        f'{mean_std(get("finetune_loss"), ".3f")} | {mean_std(pretrain_loss, ".3f")} | '
        f'{statistics.mean(get("pretrain_seconds")):.0f} | '
        f'{statistics.mean(get("finetune_seconds")):.0f} |')
  copy = next((r for runs in rows.values() for r in runs), None)
  if copy is not None:
    lines.append(f'| copy the source (baseline) | — | {copy["copy_bleu"]:.2f} | '
                 f'{copy["copy_chrf"]:.2f} | {copy["copy_rougeL"]:.2f} | | | | |')
  return lines


def plot(rows: dict[str, list[dict]], out: str) -> None:
  done = [(v, runs) for v, runs in rows.items() if runs]
  fig, ax = plt.subplots(figsize=(1.3 * len(done) + 2, 3.6))
  for x, (variant, runs) in enumerate(done):
    values = [r['bleu'] for r in runs]
    ax.bar(x, statistics.mean(values), color='tab:gray' if variant == 'none' else 'tab:blue',
           alpha=0.6)
    ax.scatter([x] * len(values), values, color='black', s=12, zorder=3)
  copy = next(r for _, runs in done for r in runs)['copy_bleu']
  highest = max(r['bleu'] for _, runs in done for r in runs)
  if copy <= 1.5 * highest:
    ax.axhline(copy, color='tab:red', linestyle='--', linewidth=1, label='copy the source')
    ax.legend(loc='upper left')
  else:  # Drawn to scale, the baseline would flatten the bars that are compared.
    ax.set_title(f'copying the source scores {copy:.1f} BLEU, above this axis', fontsize=9)
  ax.set_xticks(range(len(done)), [TITLES[v] for v, _ in done], rotation=25, ha='right')
  ax.set_ylabel(f'test BLEU ({TASK})')
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def reading(rows: dict[str, list[dict]]) -> list[str]:
  """What the table says, computed: the best variant, and whether its lead over each
  other variant exceeds the seeds' spread (the two standard deviations summed)."""
  done = {v: [r['bleu'] for r in runs] for v, runs in rows.items() if len(runs) >= 2}
  if len(done) < 2:
    return ['Too few finished runs (two seeds or more per variant) to compare.']
  best = max(done, key=lambda v: statistics.mean(done[v]))
  lines = [f'- Highest mean test BLEU: **{TITLES[best]}** '
           f'({statistics.mean(done[best]):.2f}).']
  for variant, values in done.items():
    if variant == best:
      continue
    gap = statistics.mean(done[best]) - statistics.mean(values)
    spread = statistics.stdev(done[best]) + statistics.stdev(values)
    verdict = 'beyond' if gap > spread else 'within'
    lines.append(f'- vs {TITLES[variant]}: +{gap:.2f} BLEU, {verdict} the seeds\' spread '
                 f'({spread:.2f}).')
  copy = next(r for runs in rows.values() for r in runs)['copy_bleu']
  if statistics.mean(done[best]) < copy:
    lines.append(f'- Every variant stays below copying the source ({copy:.2f} BLEU): at this '
                 'budget no model has learned the task itself, so the ranking is of how '
                 'far each got, not of finished models.')
  return lines


def write_report(settings: Settings, workdir: str, out: str) -> None:
  rows = collect(settings, workdir)
  if not any(rows.values()):
    raise FileNotFoundError(f'no finished point in {workdir}: run without --report_only first')
  image = os.path.splitext(out)[0] + '.png'
  plot(rows, image)
  done, expected = sum(map(len, rows.values())), len(point_names(settings))
  examples = int(next(r['examples'] for runs in rows.values() for r in runs))
  size = _family(settings.study).SIZES['study']
  question = {
      'bart': ('Which of BART\'s noising functions makes the best pretraining for a '
               'generation task (Lewis et al. 2020, table 1)? The paper keeps text infilling '
               '+ sentence permutation.'),
      't5': ('Which of T5\'s unsupervised objectives makes the best pretraining at equal '
             'compute (Raffel et al. 2020, table 4): prefix LM, BERT-style denoising, or span '
             'corruption?'),
  }[settings.study]
  lines = [
      f'# The {settings.study.upper()} pretraining study', '',
      f'Command: `python -m studies.denoising_study --study={settings.study} '
      f'--workdir={workdir}`', '',
      f'Question: {question}', '',
      (f'Setup: pretraining on both sides of bible/en_es (English and Spanish verses as '
       f'monolingual documents), a {size["vocab_size"]}-piece BPE vocabulary, '
       f'{size["num_layers"]} + {size["num_layers"]} layers of width {size["embed_dim"]}, '
       f'rows of {size["seq_len"]} input tokens, batch {size["batch_size"]}, '
       f'{settings.pretrain_steps} steps for every variant; then {settings.finetune_steps} '
       f'steps of fine-tuning on `{TASK}` (KJV -> WEB, with its prefix; '
       'configs/text_to_text.py: constant learning rate after a short warmup, label '
       f'smoothing 0.1) from every pretrained model, and from a random initialisation '
       f'(no pretraining). Test: the first {examples} test verses, beam {settings.beam_size}, '
       'sacrebleu BLEU and chrF, ROUGE-L (rouge-score). Seeds change the initialisation, '
       'the noise and the batch order.'), '',
  ]
  if done < expected:
    lines += [f'**Partial: {done} of {expected} runs finished**; re-run the command to '
              'resume (finished runs are skipped).', '']
  lines += [*table(rows), '', f'![test BLEU by pretraining]({os.path.basename(image)})', '',
            '## Reading (computed from the table)', '', *reading(rows), '',
            ('Scale: a small corpus and a few hundred steps on 2 CPU cores, far from the '
             'papers\' budgets; the comparison is between variants at equal steps on the '
             'same data, and a gap within the seeds\' spread does not separate them.'), '']
  with open(out, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(table(rows)))
  print(f'wrote {out} and {image}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--study', choices=sorted(STUDIES), required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='', help='default: docs/study_<study>_pretraining.md')
  parser.add_argument('--seeds', type=int, default=Settings.seeds)
  parser.add_argument('--pretrain_steps', type=int, default=Settings.pretrain_steps)
  parser.add_argument('--finetune_steps', type=int, default=Settings.finetune_steps)
  parser.add_argument('--beam_size', type=int, default=Settings.beam_size)
  parser.add_argument('--max_examples', type=int, default=Settings.max_examples)
  parser.add_argument('--variants', default='', help='run only these (comma-separated); the '
                      'page shows every finished run')
  parser.add_argument('--report_only', action='store_true')
  args = parser.parse_args(argv)
  variants = tuple(filter(None, args.variants.split(','))) or None
  if variants and not set(variants) <= set(STUDIES[args.study]):
    parser.error(f'--variants must name some of {", ".join(STUDIES[args.study])}')
  if not 1 <= args.seeds <= len(SEEDS):
    parser.error(f'--seeds must lie in 1..{len(SEEDS)}')
  logging.set_verbosity(logging.WARNING)
  settings = Settings(study=args.study, seeds=args.seeds, pretrain_steps=args.pretrain_steps,
                      finetune_steps=args.finetune_steps, beam_size=args.beam_size,
                      max_examples=args.max_examples)
  if not args.report_only:
    run(settings, args.workdir, variants)
  write_report(settings, args.workdir,
               args.out or f'docs/study_{args.study}_pretraining.md')


if __name__ == '__main__':
  main()
