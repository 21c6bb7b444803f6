"""Writes docs/positions.md and its plot from a positions sweep and its length evaluation.

  python -m training.positions_report --workdir=workdirs/positions --out=docs/positions.md

Every number comes from the sweep's `<point>/result.json` files and `length_eval.json`
(training/sweep.py, training/length_eval.py); nothing here is typed by hand but the
description of how each scheme is built and what is usually claimed for it.
"""

import argparse
import importlib.metadata
import json
import math
import os
import platform

from training import length_eval
from training import metrics as metrics_lib
from training import sweep as sweep_lib

# How each scheme is built (the by-construction half of question 1) and the usual claim
# about it (lecture and papers) that the measurements are compared with.
CONSTRUCTION = {
    'none': ('no positional signal; the causal mask alone orders tokens', False),
    'learned': ('a learned table of max_len absolute embeddings', True),
    'sinusoidal': ('fixed sinusoids of the absolute position, any position', False),
    'shaw': ('learned relative keys/values, distances clipped at relative_window', False),
    't5': ('a learned bias per log-spaced distance bucket and head', False),
    'rope': ('q and k rotated by position-dependent angles; q.k sees i - j', False),
    'alibi': ('a fixed linear penalty -m_h |i - j| on the logits', False),
    'deberta': ('disentangled content/relative-position terms over log buckets', False),
}
# The usual claim: does the scheme hinder generalisation to positions beyond training?
CLAIMED_HINDERS = {'none': False, 'learned': True, 'sinusoidal': False, 'shaw': False,
                   't5': False, 'rope': False, 'alibi': False, 'deberta': False}
# Ratios ppl(4L)/ppl(L) up to NO_HARM count as "does not hinder"; above HARM as "hinders".
NO_HARM, HARM = 1.02, 1.10
# A scheme whose perplexity at L is over FAILED x that without positions did not train.
FAILED = 1.5


def lengths(entry: dict) -> list[tuple[int, dict | None]]:
  """(length, report) sorted by length (JSON keys are strings)."""
  return sorted(((int(t), r) for t, r in entry['lengths'].items()), key=lambda x: x[0])


def ratio(entry: dict) -> float | None:
  rows = lengths(entry)
  first, last = rows[0][1], rows[-1][1]
  return last['perplexity'] / first['perplexity'] if first and last else None


def verdict(entry: dict, failed: bool = False) -> tuple[str, bool | None]:
  """(answer to 'does it hinder generalisation to new positions?', hinders or None)."""
  r = ratio(entry)
  if failed:
    return (f'inconclusive: it did not train at L (4L / L = {r:.3f} of a model that learned '
            'little)'), None
  if r is None:
    return 'yes: it cannot run past L at all (no embedding beyond L)', True
  pct = 100 * (r - 1)
  if r <= NO_HARM:
    return f'no: perplexity at 4L is {pct:+.1f}% vs L', False
  if r <= HARM:
    return f'mildly: perplexity at 4L is {pct:+.1f}% vs L', False
  return f'yes: perplexity at 4L is {pct:+.1f}% vs L', True


def _versions() -> str:
  names = ('jax', 'flax', 'optax', 'orbax-checkpoint', 'grain')
  found = []
  for name in names:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return f'python {platform.python_version()}, ' + ', '.join(found)


def _cell(report: dict | None) -> str:
  return f"{report['perplexity']:.2f}" if report else 'n/a (no embedding beyond L)'


def agreement(claimed: bool | None, answer: str, hinders: bool | None) -> str:
  """'yes', 'partly' (a mild rise where none was claimed), '**no**', or '' if undecided."""
  if claimed is None or hinders is None:
    return ''
  if claimed == hinders:
    return 'partly' if answer.startswith('mildly') and not claimed else 'yes'
  return '**no**'


def _vs(entry: dict, base_ppl: float | None) -> str:
  at_l = lengths(entry)[0][1]['perplexity']
  return f'{at_l / base_ppl:.2f}' if base_ppl else ''


def failed_at_l(evals: dict) -> list[str]:
  """Schemes whose perplexity at L is over FAILED x that of no positions at all."""
  if 'none' not in evals:
    return []
  base = lengths(evals['none'])[0][1]['perplexity']
  return [n for n, e in evals.items() if lengths(e)[0][1]['perplexity'] > FAILED * base]


def train_losses(run_dir: str) -> list[tuple[int, float]]:
  return [(r['step'], r['loss']) for r in metrics_lib.read_metrics(run_dir)
          if r['split'] == 'train' and 'loss' in r]


def caveats(evals: dict, cfg: dict, workdir: str) -> str:
  """Notes on schemes that did not train at L, with what explains them where known."""
  notes = []
  for name in failed_at_l(evals):
    entry = evals[name]
    ppl = lengths(entry)[0][1]['perplexity']
    base = lengths(evals['none'])[0][1]['perplexity']
    note = (f'- **{name}** did not train at L: perplexity {ppl:.1f} against {base:.1f} '
            'without positions, so its 4L / L ratio says little about new positions.')
    if entry['position'] == 'sinusoidal':
      d = cfg['model']['embed_dim']
      note += (' A likely cause (not tested here): the sinusoids are added unscaled '
               f'(entries in [-1, 1], norm sqrt(D/2) = '
               f'{math.sqrt(d / 2):.1f} per token at D = {d}) to token embeddings initialised '
               f'with std 0.02 (norm about {0.02 * math.sqrt(d):.2f}): the position signal '
               'swamps the tokens.')
      losses = train_losses(os.path.join(workdir, name))
      if len(losses) > 2:
        (s1, l1), (sn, ln) = losses[1], losses[-1]
        note += f' Its training loss was {l1:.2f} at step {s1} and {ln:.2f} at step {sn}.'
      note += (' '
               'Vaswani et al. multiply the token embeddings by sqrt(D); models/ does not, '
               'which is worth an issue.')
    notes.append(note)
  return '\n'.join(notes)


def table(results: dict, evals: dict) -> str:
  rows = lengths(next(iter(evals.values())))
  train_len = rows[0][0]
  heads = [f'ppl @ {t} ({t // train_len}L)' if t != train_len else f'ppl @ {t} (L)'
           for t, _ in rows]
  base = evals.get('none')
  base_ppl = lengths(base)[0][1]['perplexity'] if base else None
  lines = ['| scheme | fixed set of positions? | params added | ' + ' | '.join(heads) +
           ' | L vs none | 4L / L | hinders new positions? (measured) | usual claim | agrees? |',
           '|---|---|---|' + '---|' * len(heads) + '---|---|---|---|---|']
  failed = failed_at_l(evals)
  for name, entry in evals.items():
    r = ratio(entry)
    answer, hinders = verdict(entry, name in failed)
    claimed = CLAIMED_HINDERS.get(entry['position'])
    agrees = agreement(claimed, answer, hinders)
    fixed = 'yes' if entry['fixed_positions'] else 'no'
    lines.append(
        f"| {name} | {fixed} | {entry['params_added']:,} | " +
        ' | '.join(_cell(rep) for _, rep in lengths(entry)) +
        f" | {_vs(entry, base_ppl)} | {'n/a' if r is None else f'{r:.3f}'} | {answer} | "
        f"{'' if claimed is None else ('hinders' if claimed else 'does not')} | {agrees} |")
  return '\n'.join(lines)


def model_line(cfg: dict) -> str:
  """The sweep's shared settings, in one line."""
  m, d = cfg['model'], cfg['data']
  return (f"{m['num_layers']} layers, {m['num_heads']} heads, width {m['embed_dim']}, "
          f"MLP {m['mlp_dim']}, vocabulary {d['vocab_size']} (BPE), batch {d['batch_size']} "
          f"rows of L, {cfg['train']['num_steps']} steps (peak lr "
          f"{cfg['optimizer']['learning_rate']}, {cfg['optimizer']['decay']}), seed "
          f"{cfg['seed']}: identical for every scheme but `model.position` (shaw: "
          f"relative_window={m.get('relative_window', 16)}; t5/deberta: "
          f"{m.get('relative_buckets', 32)} buckets up to distance "
          f"{m.get('relative_max_distance', 128)}; rope base {m.get('rope_base', 10000.0):g}).")


def plot(evals: dict, out: str) -> None:
  """Left: perplexity against length; right: the same relative to each scheme's at L."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 4.8))
  markers = 'osD^v<>ph*'
  values = []
  for i, (name, entry) in enumerate(evals.items()):
    points = [(t, rep['perplexity']) for t, rep in lengths(entry) if rep]
    values += [p for _, p in points]
    style = dict(marker=markers[i % len(markers)], label=name)
    ax.plot([t for t, _ in points], [p for _, p in points], **style)
    rel.plot([t for t, _ in points], [p / points[0][1] for _, p in points], **style)
  ticks = [t for t, _ in lengths(next(iter(evals.values())))]
  train_len = ticks[0]
  for a in (ax, rel):
    a.set_xscale('log', base=2)
    a.set_xticks(ticks, [f'{t}\n({t // train_len}L)' for t in ticks])
    a.set_xlabel('evaluation length (tokens per row)')
    a.grid(alpha=0.3, which='both')
  if max(values) / min(values) > 3:  # log-y only where a scheme is far off the rest
    ax.set_yscale('log')
  ax.set_ylabel('validation perplexity')
  ax.set_title(f'Trained at L = {train_len}')
  rel.axhline(1.0, color='grey', alpha=0.5, linestyle=':')
  rel.set_ylabel('perplexity / perplexity at L')
  rel.set_title('Relative to L (above 1: unseen positions cost)')
  ax.legend(ncol=2, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def write(workdir: str, out: str, command: str) -> None:
  with open(os.path.join(workdir, length_eval.OUTPUT)) as f:
    evals = json.load(f)
  # The schemes in the order of CONSTRUCTION (JSON keeps them sorted by name), others after.
  order = list(CONSTRUCTION)
  evals = dict(sorted(evals.items(), key=lambda kv: (
      order.index(kv[1]['position']) if kv[1]['position'] in order else len(order), kv[0])))
  results = {name: sweep_lib.read_result(workdir, name) for name in evals}
  first = next(iter(results.values()))
  cfg = first['config']
  png = os.path.splitext(out)[0] + '.png'
  plot(evals, png)
  train_s = sum(r['train_seconds'] for r in results.values())
  eval_s = sum(rep['seconds'] for e in evals.values() for _, rep in lengths(e) if rep)
  per_point = ', '.join(f"{n} {r['train_seconds']:.0f}s" for n, r in results.items())
  failed = failed_at_l(evals)
  answers = '\n'.join(
      f"- **{name}** ({CONSTRUCTION.get(e['position'], ('?', None))[0]}). "
      f"Fixed set of positions: {'yes' if e['fixed_positions'] else 'no'}"
      f"{' (its parameters change shape with max_len)' if e['fixed_positions'] else ''}. "
      f'Hinders new positions: {verdict(e, name in failed)[0]}.'
      for name, e in evals.items())
  disagreements = [n for n, e in evals.items()
                   if agreement(CLAIMED_HINDERS.get(e['position']),
                                *verdict(e, n in failed)) in ('partly', '**no**')]
  text = f"""# Positional schemes: fixed positions and length generalisation

Issue 3's study. The same small GPT is trained with each positional scheme at L =
{cfg['data']['seq_len']} tokens on the offline Bible corpus (`bible/en`), then its
validation perplexity is measured at L, 2L and 4L with `loop.evaluate`, the code of
training's own evaluation (the L column reproduces each run's final logged validation).

Command: `{command}` (`configs/gpt_positions.py`, `training/sweep.py`,
`training/length_eval.py`, `training/positions_report.py`)

Model: {model_line(cfg)}

Machine: {metrics_lib.describe_machine()}; {_versions()}. Shared with other jobs.
Wall time: training {train_s:.0f}s in all ({per_point}; each includes start-up and
compilation); length evaluation {eval_s:.0f}s.

## Results

{table(results, evals)}

![validation perplexity against evaluation length](positions.png)

"Fixed set of positions?" is decided from the model itself: a scheme is fixed when its
parameters change shape with `max_len` (`length_eval.fixed_positions`); such a model has
no embedding for positions past L and is not evaluated there. "Hinders new positions?"
reads the ratio ppl(4L) / ppl(L): up to {NO_HARM} "no", up to {HARM} "mildly", above "yes".
"Usual claim" is the textbook answer (learned absolute embeddings cannot go past their
table; sinusoids and relative schemes are meant to); "agrees?" compares it with the measured
answer. "L vs none" is the perplexity at L over that of the model without positions.

## The two questions, per scheme

{answers}

{caveats(evals, cfg, workdir)}

{'Where the measurements depart (fully or partly) from the usual claim: ' +
 ', '.join(disagreements) + '. A rise of perplexity with length, despite the extra context '
 'each token gets, means the scheme does not carry over to unseen positions for free.'
 if disagreements else 'The measurements agree with the usual claim for every scheme.'}

## How to read the lengths

The pipeline (`data/pipeline.py`) tokenizes each chapter as [bos] + ids + [eos], cuts it into
chunks of seq_len tokens and packs the chunks into rows of seq_len (first fit); positions
restart at 0 for each chunk, and attention stays within a chunk. Evaluating at 2L or 4L sets
seq_len to 2L or 4L, so a chapter (about a thousand tokens) gives chunks whose positions run
to 2L-1 or 4L-1, positions the model never saw in training. The same chunks also give each
token more context, which by itself lowers perplexity; so a flat or falling curve means the
scheme copes with unseen positions (and may use the longer context), a rising one means the
unseen positions cost more than the extra context gains. The number of evaluation batches
is divided by the factor, so each length covers about the same
{next(iter(evals.values()))['lengths'][str(cfg['data']['seq_len'])]['tokens']:.0f} validation
tokens (the same chapters, from the start of the split).

This is one seed of a small model trained briefly: differences of a percent or two between
schemes are within what another seed could change.

```json
{json.dumps(evals, indent=1, sort_keys=True)}
```
"""
  with open(out, 'w') as f:
    f.write(text)
  print(f'wrote {out} and {png}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='the sweep, after length_eval')
  parser.add_argument('--out', default='docs/positions.md')
  parser.add_argument('--command', default='make positions',
                      help='the command the doc says produced it')
  args = parser.parse_args(argv)
  write(args.workdir, args.out, args.command)


if __name__ == '__main__':
  main()
