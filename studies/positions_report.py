"""Writes docs/positions.md and its plot from a positions sweep and its length evaluation.

  python -m studies.positions_report --workdir=workdirs/positions --out=docs/positions.md

Every number comes from the sweep's `<point>/result.json` files and `length_eval.json`
(training/sweep.py, studies/length_eval.py); nothing here is typed by hand but the
description of how each scheme is built and what is usually claimed for it.

The runs are grouped by scheme (`model.position`); the runs of a scheme differ in their seed
only (configs/gpt_positions.py names them `rope-s0`, `rope-s1`, ...), and each number is
reported as the mean ± the sample standard deviation over the seeds. A verdict holds only
where the whole band mean ± std of the per-seed ratios ppl(4L) / ppl(L) lies on one side of
each threshold (`verdict`); otherwise it says the seeds leave it within noise.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform

from studies import length_eval
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
# Ratios ppl(4L)/ppl(L) up to NO_HARM count as "does not hinder"; above HARM as "hinders"
# (with several seeds: the whole band mean ± std, see `verdict`).
NO_HARM, HARM = 1.02, 1.10
# A scheme whose perplexity at L is over FAILED x that without positions did not train
# (means over seeds).
FAILED = 1.5


def lengths(entry: dict) -> list[tuple[int, dict | None]]:
  """(length, report) sorted by length (JSON keys are strings)."""
  return sorted(((int(t), r) for t, r in entry['lengths'].items()), key=lambda x: x[0])


def ratio(entry: dict) -> float | None:
  """One run's ppl(longest) / ppl(L), or None where it has no report past L."""
  rows = lengths(entry)
  first, last = rows[0][1], rows[-1][1]
  return last['perplexity'] / first['perplexity'] if first and last else None


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and sample standard deviation (n - 1 denominator) of per-seed values.

  `std` is None for a single seed: one run says nothing about the spread.
  """
  mean: float
  std: float | None
  n: int

  @property
  def low(self) -> float:
    return self.mean - (self.std or 0.0)

  @property
  def high(self) -> float:
    return self.mean + (self.std or 0.0)

  def format(self, digits: int, scale: float = 1.0, sign: str = '', unit: str = '') -> str:
    """'34.90 ± 0.41', or '34.90' alone for one seed; values times `scale`, then `unit`."""
    mean = f'{self.mean * scale:{sign}.{digits}f}{unit}'
    return mean if self.std is None else f'{mean} ± {self.std * scale:.{digits}f}{unit}'


def stat(values: list[float]) -> Stat:
  n = len(values)
  if n == 0:
    raise ValueError('no values to aggregate')
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return Stat(mean, std, n)


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained point of the sweep: its name, seed, length evaluation and result.json."""
  name: str
  seed: int
  entry: dict
  result: dict


# What a scheme's runs may differ in: the seeds and, across schemes, the scheme itself.
VARYING = (('seed',), ('data', 'seed'), ('model', 'position'))


def _setup(config: dict) -> dict:
  """The config without the fields in VARYING: equal for every run of one study."""
  config = json.loads(json.dumps(config))
  for path in VARYING:
    parent = config
    for key in path[:-1]:
      parent = parent.get(key, {})
    parent.pop(path[-1], None)
  return config


def group(evals: dict, results: dict) -> dict[str, list[Run]]:
  """{scheme: its runs, by seed}, schemes in the order of CONSTRUCTION, others after.

  Refuses runs whose configs differ in more than VARYING (their mean would mix two
  studies) and two runs of one scheme with the same seed (e.g. points left from an older
  naming in the same workdir).
  """
  setups = {name: _setup(results[name]['config']) for name in evals}
  first = next(iter(setups))
  for name, setup in setups.items():
    if setup != setups[first]:
      raise ValueError(f'{name} and {first} differ in more than the scheme and seed: one '
                       'report aggregates one study (points of an older sweep in the '
                       'workdir? give the sweep a fresh --workdir)')
  groups: dict[str, list[Run]] = {}
  for name, entry in evals.items():
    seed = results[name]['config']['seed']
    runs = groups.setdefault(entry['position'], [])
    twin = [r.name for r in runs if r.seed == seed]
    if twin:
      raise ValueError(f'{twin[0]} and {name} are both {entry["position"]} with seed {seed} '
                       '(points of an older sweep in the workdir?)')
    runs.append(Run(name, seed, entry, results[name]))
  order = list(CONSTRUCTION)
  return {scheme: sorted(runs, key=lambda r: r.seed) for scheme, runs in sorted(
      groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                      kv[0]))}


def seeds(runs: list[Run]) -> list[int]:
  return [r.seed for r in runs]


def ppl_stats(runs: list[Run]) -> list[tuple[int, Stat | None]]:
  """(length, perplexity over seeds), or None where the runs have no report at a length."""
  rows = []
  for i, (length, _) in enumerate(lengths(runs[0].entry)):
    reports = [lengths(r.entry)[i][1] for r in runs]
    rows.append((length, stat([rep['perplexity'] for rep in reports])
                 if all(reports) else None))
  return rows


def ppl_at_l(runs: list[Run]) -> Stat:
  return ppl_stats(runs)[0][1]


def ratio_stat(runs: list[Run]) -> Stat | None:
  """ppl(4L) / ppl(L) per seed, then over seeds; None where the runs cannot go past L."""
  values = [ratio(r.entry) for r in runs]
  return None if None in values else stat(values)


def vs_none(runs: list[Run], base: list[Run] | None) -> Stat | None:
  """ppl(L) over that of the model without positions with the same seed (same data order),
  then over the seeds both have."""
  if not base:
    return None
  base_ppl = {r.seed: lengths(r.entry)[0][1]['perplexity'] for r in base}
  values = [lengths(r.entry)[0][1]['perplexity'] / base_ppl[r.seed]
            for r in runs if r.seed in base_ppl]
  return stat(values) if values else None


def category(r: float) -> str:
  """The answer a single ratio ppl(4L) / ppl(L) gives."""
  return 'no' if r <= NO_HARM else 'mildly' if r <= HARM else 'yes'


def verdict(runs: list[Run], failed: bool = False) -> tuple[str, bool | None]:
  """(answer to 'does it hinder generalisation to new positions?', hinders or None).

  The answer is that of the band mean ± std of the per-seed ratios: where the band
  crosses a threshold, the seeds do not decide between the answers on either side, and
  the answer names both, "within noise".
  """
  r = ratio_stat(runs)
  if failed:
    ratio_text = 'n/a' if r is None else r.format(3)
    return (f'inconclusive: it did not train at L (4L / L = {ratio_text} of a model that '
            'learned little)'), None
  if r is None:
    return 'yes: it cannot run past L at all (no embedding beyond L)', True
  low, high = category(r.low), category(r.high)
  change = f'perplexity at 4L is {Stat(r.mean - 1, r.std, r.n).format(1, 100, "+", "%")} vs L'
  if low == high:
    return f'{low}: {change}', low == 'yes'
  # Both sides of a threshold: "no or mildly" does not hinder either way; past HARM it may.
  return f'within noise, {low} or {high}: {change}', False if high == 'mildly' else None


def _versions() -> str:
  names = ('jax', 'flax', 'optax', 'orbax-checkpoint', 'grain')
  found = []
  for name in names:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return f'python {platform.python_version()}, ' + ', '.join(found)


def _cell(value: Stat | None) -> str:
  return value.format(2) if value else 'n/a (no embedding beyond L)'


def agreement(claimed: bool | None, answer: str, hinders: bool | None) -> str:
  """'yes', 'partly' (a mild rise where none was claimed), '**no**', or '' if undecided."""
  if claimed is None or hinders is None:
    return ''
  if claimed == hinders:
    return 'partly' if answer.startswith('mildly') and not claimed else 'yes'
  return '**no**'


def failed_at_l(groups: dict[str, list[Run]]) -> list[str]:
  """Schemes whose mean perplexity at L is over FAILED x that of no positions at all."""
  if 'none' not in groups:
    return []
  base = ppl_at_l(groups['none']).mean
  return [n for n, runs in groups.items() if ppl_at_l(runs).mean > FAILED * base]


def train_losses(run_dir: str) -> list[tuple[int, float]]:
  return [(r['step'], r['loss']) for r in metrics_lib.read_metrics(run_dir)
          if r['split'] == 'train' and 'loss' in r]


def caveats(groups: dict[str, list[Run]], cfg: dict, workdir: str) -> str:
  """Notes on schemes that did not train at L, with what explains them where known."""
  notes = []
  for name in failed_at_l(groups):
    runs = groups[name]
    per_seed = ', '.join(f"{lengths(r.entry)[0][1]['perplexity']:.1f}" for r in runs)
    note = (f'- **{name}** did not train at L: perplexity {ppl_at_l(runs).format(1)} '
            f'(seeds {", ".join(map(str, seeds(runs)))}: {per_seed}) against '
            f"{ppl_at_l(groups['none']).format(1)} without positions, so its 4L / L ratio "
            'says little about new positions.')
    if name == 'sinusoidal':
      d = cfg['model']['embed_dim']
      # The position signal's size against the tokens' (models/positions.py scales the
      # sinusoids by model.sinusoid_scale; entries of the sinusoids lie in [-1, 1]).
      scale = cfg['model'].get('sinusoid_scale', 1.0)
      note += (f' Its positions have norm {scale:g} * sqrt(D/2) = {scale * math.sqrt(d / 2):.2f} '
               f'per token at D = {d}, against about {0.02 * math.sqrt(d):.2f} for token '
               'embeddings initialised with std 0.02; a position signal much larger than '
               'the tokens swamps them (not tested here).')
      losses = train_losses(os.path.join(workdir, runs[0].name))
      if len(losses) > 2:
        (s1, l1), (sn, ln) = losses[1], losses[-1]
        note += (f' Its training loss (seed {runs[0].seed}) was {l1:.2f} at step {s1} and '
                 f'{ln:.2f} at step {sn}.')
    notes.append(note)
  return '\n'.join(notes)


def table(groups: dict[str, list[Run]]) -> str:
  rows = ppl_stats(next(iter(groups.values())))
  train_len = rows[0][0]
  heads = [f'ppl @ {t} ({t // train_len}L)' if t != train_len else f'ppl @ {t} (L)'
           for t, _ in rows]
  lines = ['| scheme | seeds | fixed set of positions? | params added | ' + ' | '.join(heads) +
           ' | L vs none | 4L / L | hinders new positions? (measured) | usual claim | agrees? |',
           '|---|---|---|---|' + '---|' * len(heads) + '---|---|---|---|---|']
  failed = failed_at_l(groups)
  for name, runs in groups.items():
    entry = runs[0].entry  # what is fixed by construction is the same for every seed
    r = ratio_stat(runs)
    vs = vs_none(runs, groups.get('none'))
    said, hinders = verdict(runs, name in failed)
    claimed = CLAIMED_HINDERS.get(name)
    agrees = agreement(claimed, said, hinders)
    fixed = 'yes' if entry['fixed_positions'] else 'no'
    lines.append(
        f"| {name} | {len(runs)} | {fixed} | {entry['params_added']:,} | " +
        ' | '.join(_cell(value) for _, value in ppl_stats(runs)) +
        f" | {vs.format(2) if vs else ''} | {'n/a' if r is None else r.format(3)} | "
        f"{said} | {'' if claimed is None else ('hinders' if claimed else 'does not')} | "
        f'{agrees} |')
  return '\n'.join(lines)


def model_line(cfg: dict, seed_list: list[int]) -> str:
  """The sweep's shared settings, in one line."""
  m, d = cfg['model'], cfg['data']
  return (f"{m['num_layers']} layers, {m['num_heads']} heads, width {m['embed_dim']}, "
          f"MLP {m['mlp_dim']}, vocabulary {d['vocab_size']} (BPE), batch {d['batch_size']} "
          f"rows of L, {cfg['train']['num_steps']} steps (peak lr "
          f"{cfg['optimizer']['learning_rate']}, {cfg['optimizer']['decay']}), "
          f"seed{'s' if len(seed_list) > 1 else ''} {', '.join(map(str, seed_list))} "
          '(`seed` and `data.seed`: the initialisation and the order of the training data): '
          'identical for every scheme but `model.position` (shaw: '
          f"relative_window={m.get('relative_window', 16)}; t5/deberta: "
          f"{m.get('relative_buckets', 32)} buckets up to distance "
          f"{m.get('relative_max_distance', 128)}; rope base {m.get('rope_base', 10000.0):g}).")


def relative_stats(runs: list[Run]) -> list[tuple[int, Stat]]:
  """(length, ppl(length) / ppl(L) per seed, then over seeds) where every seed has both."""
  rows = []
  for i, (length, _) in enumerate(lengths(runs[0].entry)):
    pairs = [(lengths(r.entry)[0][1], lengths(r.entry)[i][1]) for r in runs]
    if all(first and rep for first, rep in pairs):
      rows.append((length, stat([rep['perplexity'] / first['perplexity']
                                 for first, rep in pairs])))
  return rows


def plot(groups: dict[str, list[Run]], out: str) -> None:
  """Left: mean perplexity against length; right: each seed's relative to its own at L,
  averaged. Error bars: the sample std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 4.8))
  markers = 'osD^v<>ph*'
  values = []
  for i, (name, runs) in enumerate(groups.items()):
    # Nudge each scheme sideways (log x) so that the error bars do not hide each other.
    shift = 1 + 0.012 * (i - (len(groups) - 1) / 2)
    style = dict(marker=markers[i % len(markers)], label=name, capsize=3)
    for axis, points in ((ax, [(t, v) for t, v in ppl_stats(runs) if v]),
                         (rel, relative_stats(runs))):
      axis.errorbar([t * shift for t, _ in points], [v.mean for _, v in points],
                    yerr=[v.std or 0.0 for _, v in points], **style)
    values += [v.mean for _, v in ppl_stats(runs) if v]
  ticks = [t for t, _ in lengths(next(iter(groups.values()))[0].entry)]
  train_len = ticks[0]
  for a in (ax, rel):
    a.set_xscale('log', base=2)
    a.set_xticks(ticks, [f'{t}\n({t // train_len}L)' for t in ticks])
    a.set_xlabel('evaluation length (tokens per row)')
    a.grid(alpha=0.3, which='both')
  if max(values) / min(values) > 3:  # log-y only where a scheme is far off the rest
    ax.set_yscale('log')
  n = sorted({len(runs) for runs in groups.values()})
  ax.set_ylabel('validation perplexity (mean over seeds)')
  spread = 'bars: ± std over seeds' if n[-1] > 1 else 'one seed, no spread'
  ax.set_title(f"Trained at L = {train_len}; {'/'.join(map(str, n))} seed"
               f"{'s' if n[-1] > 1 else ''} per scheme ({spread})")
  rel.axhline(1.0, color='grey', alpha=0.5, linestyle=':')
  rel.set_ylabel('perplexity / perplexity at L')
  rel.set_title('Relative to L (above 1: unseen positions cost)')
  ax.legend(ncol=2, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def answer(name: str, runs: list[Run], failed: bool) -> str:
  """The scheme's answers to the two questions, as one bullet."""
  fixed = runs[0].entry['fixed_positions']
  return (f"- **{name}** ({CONSTRUCTION.get(name, ('?', None))[0]}). "
          f"Fixed set of positions: {'yes' if fixed else 'no'}"
          f"{' (its parameters change shape with max_len)' if fixed else ''}. "
          f'Hinders new positions: {verdict(runs, failed)[0]}.')


def spread_text(groups: dict[str, list[Run]]) -> str:
  """How the cells aggregate the seeds, with the number of seeds, from the runs."""
  counts = sorted({len(runs) for runs in groups.values()})
  seed_list = sorted({r.seed for runs in groups.values() for r in runs})
  if counts == [1]:
    return ('Each scheme was trained with one seed, so no spread is shown: differences of a '
            'percent or two between schemes are within what another seed could change.')
  n = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]} (column 'seeds')"
  return (f'Each scheme was trained with {n} seeds (of {", ".join(map(str, seed_list))}); a '
          'seed sets both the initialisation and the order of the training data, while the '
          'validation data is the same for all. A cell reads mean ± sample standard '
          'deviation over the seeds (n - 1 in the denominator); ratios (4L / L, L vs none) '
          "are taken per seed, then aggregated, and \"L vs none\" pairs each seed with the "
          'same seed of the model without positions.')


def write(workdir: str, out: str, command: str) -> None:
  with open(os.path.join(workdir, length_eval.OUTPUT)) as f:
    evals = json.load(f)
  results = {name: sweep_lib.read_result(workdir, name) for name in evals}
  groups = group(evals, results)
  first = next(iter(results.values()))
  cfg = first['config']
  seed_list = sorted({r.seed for runs in groups.values() for r in runs})
  png = os.path.splitext(out)[0] + '.png'
  plot(groups, png)
  train_s = sum(r['train_seconds'] for r in results.values())
  eval_s = sum(rep['seconds'] for e in evals.values() for _, rep in lengths(e) if rep)
  per_scheme = ', '.join(
      f"{name} {sum(r.result['train_seconds'] for r in runs):.0f}s"
      for name, runs in groups.items())
  failed = failed_at_l(groups)
  answers = '\n'.join(answer(name, runs, name in failed) for name, runs in groups.items())
  disagreements = [n for n, runs in groups.items()
                   if agreement(CLAIMED_HINDERS.get(n),
                                *verdict(runs, n in failed)) in ('partly', '**no**')]
  text = f"""# Positional schemes: fixed positions and length generalisation

Issue 3's study. The same small GPT is trained with each positional scheme at L =
{cfg['data']['seq_len']} tokens on the offline Bible corpus (`bible/en`), with
{len(seed_list)} seed{'s' if len(seed_list) > 1 else ''} per scheme, then its
validation perplexity is measured at L, 2L and 4L with `loop.evaluate`, the code of
training's own evaluation (at L, each run reproduces its final logged validation).

Command: `{command}` (`configs/gpt_positions.py`, `training/sweep.py`,
`studies/length_eval.py`, `studies/positions_report.py`)

Model: {model_line(cfg, seed_list)}

Machine: {metrics_lib.describe_machine()}; {_versions()}. Shared with other jobs.
Wall time: training {train_s:.0f}s in all ({per_scheme}, summed over seeds; each run
includes start-up and compilation); length evaluation {eval_s:.0f}s.

## Results

{table(groups)}

![validation perplexity against evaluation length](positions.png)

{spread_text(groups)}

"Fixed set of positions?" is decided from the model itself: a scheme is fixed when its
parameters change shape with `max_len` (`length_eval.fixed_positions`); such a model has
no embedding for positions past L and is not evaluated there. "Hinders new positions?"
reads the ratio ppl(4L) / ppl(L): up to {NO_HARM} "no", up to {HARM} "mildly", above "yes".
With several seeds the answer is that of the whole band mean ± std of the per-seed ratios;
where the band crosses {NO_HARM} or {HARM}, the seeds cannot tell the two answers apart
and the verdict says "within noise" and names both (counted as not hindering for
"no or mildly", undecided for "mildly or yes"). "Usual claim" is the textbook answer
(learned absolute embeddings cannot go past their table; sinusoids and relative schemes
are meant to); "agrees?" compares it with the measured answer. "L vs none" is the
perplexity at L over that of the model without positions.

## The two questions, per scheme

{answers}

{caveats(groups, cfg, workdir)}

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
