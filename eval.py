"""Evaluates the checkpoints of a training run, or generates text from one.

  python eval.py --workdir=DIR                    # latest checkpoint: validation and test
  python eval.py --workdir=DIR --step=400         # a given step
  python eval.py --workdir=DIR --watch            # each new checkpoint, until the final one
  python eval.py --workdir=DIR --prompt="In the beginning" --sampling=greedy,top_p
  python eval.py --workdir=DIR --translate="In the beginning God created the heaven"

A seq2seq run (config.data.task='seq2seq') is also scored by BLEU, chrF and ROUGE of beam
search on each split, beside a copy-the-source baseline, and its translations are written
to DIR/eval/translations_<split>_<step>.tsv (source, reference, translation). A
text-to-text run (config.data.task='text_to_text') gets one row per (split, task) with the
task's own metrics, beside its baseline (copy the source, or the majority class), and the
outputs of each task in DIR/eval/translations_<split>_<task>_<step>.tsv. The split's own
row is the loss over every task's examples (its accuracy: the next token's); a task row's
accuracy is exact match. `--translate` takes texts as the model reads them, the task's
prefix included (--translate="translate English to Spanish: In the beginning").

The config comes from the workdir (`config.json`, written by train.py). Checkpoints are
restored onto whatever devices are present: the mesh becomes data-parallel over all of them.
"""

import dataclasses
import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from data import tasks
from data import text_to_text
from models import decoding
from objectives import regression
from training import baselines
from training import checkpoint
from training import loop
from training import translation

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate; default the latest.')
_SPLITS = flags.DEFINE_list('splits', ['validation', 'test'], 'Splits to evaluate.')
_WATCH = flags.DEFINE_bool('watch', False, 'Evaluate each new checkpoint until the final step.')
_POLL = flags.DEFINE_float('poll_seconds', 5.0, 'How often --watch looks for checkpoints.')
_TIMEOUT = flags.DEFINE_float('timeout_seconds', 24 * 3600.0,
                              '--watch gives up after this long without a new checkpoint.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Generate continuations of these prompts.')
_SAMPLING = flags.DEFINE_list('sampling', ['greedy'],
                              f'Samplers for --prompt: {sorted(decoding.SAMPLERS)}.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 40, 'k of top-k sampling.')
_TOP_P = flags.DEFINE_float('top_p', 0.9, 'p of nucleus sampling.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 40, 'Tokens to generate per prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_TRANSLATE = flags.DEFINE_multi_string(
    'translate', [], 'Translate these sentences (seq2seq runs; text-to-text runs: prefix '
    'included).')
_BEAM = flags.DEFINE_integer('beam_size', None, 'Beam size for translation; default the config\'s.')
_ALPHA = flags.DEFINE_float('alpha', None, 'Length penalty for translation; default the config\'s.')
_MAX_EXAMPLES = flags.DEFINE_integer(
    'max_examples', 0, 'Translate only the first N pairs of each split (text-to-text: of '
    'each task) (0: all).')
_UNIGRAM = flags.DEFINE_bool('unigram_baseline', False,
                             'Also report the perplexity of a unigram model of the same tokens.')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is --workdir={workdir} a train.py workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class Evaluator:
  """Restores checkpoints of one run and evaluates them with the run's own eval code."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.config = load_config(workdir)
    data_only = [-1] + [1] * (len(self.config.mesh.axes) - 1)
    self.exp = loop.build(self.config, mesh_shape=data_only)
    self.abstract, self.shardings = self.exp.abstract_state()
    self.mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False)
    self.step_fn = loop.eval_fn(self.exp, self.shardings)
    self._batches = {}
    self._predict = None

  def restore(self, step: int):
    return checkpoint.restore(self.mngr, step, self.abstract, self.shardings)

  def restore_latest(self):
    """(state, step) of the newest checkpoint that reads back whole.

    Damaged ones are reported and skipped but left in place: moving them aside is the
    training run's business, and eval.py only reads.
    """
    state, step = checkpoint.restore_latest(self.mngr, self.abstract, self.shardings,
                                            move_damaged=False)
    if state is None:
      raise FileNotFoundError(f'no readable checkpoint in {self.mngr.directory} '
                              f'(steps {sorted(self.mngr.all_steps())} are all damaged)')
    return state, step

  def batches(self, split: str):
    if split not in self._batches:
      self._batches[split] = loop.eval_split(self.exp, split)
    return self._batches[split]

  def predictions(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example predictions and labels of a split, padding rows dropped (one host)."""
    if self._predict is None:
      self._predict = jax.jit(functools.partial(regression.predict, model=self.exp.model))
    predictions, labels = [], []
    for batch in self.batches(split):
      keep = np.asarray(batch['example_weight']) > 0
      predictions.append(np.asarray(self._predict(params, batch))[keep])
      labels.append(np.asarray(batch['label'])[keep])
    return np.concatenate(predictions), np.concatenate(labels)

  def evaluate(self, step: int, splits=('validation', 'test'),
               state=None) -> dict[str, dict[str, float]]:
    state = state if state is not None else self.restore(step)
    with jax.set_mesh(self.exp.mesh):
      results = {split: loop.evaluate(self.exp, state.params, self.batches(split), self.step_fn)
                 for split in splits}
      if self.exp.objective.name == 'regression':
        # Spearman's ρ ranks every prediction of a split: it needs them all, not sums.
        for split in splits:
          predictions, labels = self.predictions(state.params, split)
          results[split]['spearman'] = regression.spearman(predictions, labels)
    out_dir = os.path.join(self.workdir, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.write_json(os.path.join(out_dir, f'step_{step}.json'),
                          {'step': step, 'results': results})
    return results


def translate_settings(config) -> translation.TranslateConfig:
  """The run's decoding settings with the flags' overrides."""
  settings = loop.translate_settings(config) or translation.TranslateConfig()
  overrides = {'beam_size': _BEAM.value, 'alpha': _ALPHA.value}
  return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


BASELINE_LABELS = {'copy': 'copy the source', 'majority': 'majority class'}


def score_translations(evaluator: Evaluator, state, step: int,
                       results: dict[str, dict[str, float]]) -> None:
  """Adds BLEU/chrF/ROUGE (and the copy baseline's) to each split's results, or for a
  text-to-text run a row per task and one for its baseline; writes the outputs beside
  them."""
  settings = translate_settings(evaluator.config)
  mixture = evaluator.exp.data.task == 'text_to_text'
  for split in _SPLITS.value:
    print(f'translating {split} (beam {settings.beam_size}, alpha {settings.alpha}) ...',
          flush=True)
    with jax.set_mesh(evaluator.exp.mesh):
      report, rows = translation.evaluate(evaluator.exp, state.params, split, settings,
                                          _MAX_EXAMPLES.value, progress=True)
    if not mixture:
      names = [k for m in translation.SEQ2SEQ_METRICS for k in translation.METRIC_KEYS[m]]
      results[split].update({k: report[k] for k in names})
      results[f'{split} (copy the source)'] = {k: report[f'copy_{k}'] for k in names}
      write_outputs(evaluator.workdir, f'translations_{split}_{step}.tsv', rows)
      continue
    for task in text_to_text.mixture_tasks(evaluator.exp.data):
      names = [k for m in task.metrics for k in translation.METRIC_KEYS[m]]
      results[f'{split} {task.name}'] = {k: report[f'{task.name}/{k}'] for k in names}
      results[f'{split} {task.name} ({BASELINE_LABELS[task.baseline]})'] = {
          k: report[f'{task.name}/{task.baseline}_{k}'] for k in names}
      write_outputs(evaluator.workdir, f'translations_{split}_{task.name}_{step}.tsv',
                    [row for row in rows if row['task'] == task.name])


def write_outputs(workdir: str, name: str, rows: list[dict[str, str]]) -> None:
  """The rows (source, reference, translation) as DIR/eval/<name>, tab-separated."""
  path = os.path.join(workdir, 'eval', name)
  with open(path, 'w') as f:
    f.write('source\treference\ttranslation\n')
    for row in rows:
      f.write('\t'.join(row[k].replace('\t', ' ') for k in ('source', 'reference',
                                                             'translation')) + '\n')
  print(f'wrote {len(rows)} translations to {path}')


def translate_sentences(evaluator: Evaluator, state) -> None:
  settings = translate_settings(evaluator.config)
  with jax.set_mesh(evaluator.exp.mesh):
    outputs = translation.translate(evaluator.exp, state.params, _TRANSLATE.value, settings)
  print(f'\n[beam {settings.beam_size}, alpha {settings.alpha}]')
  for source, output in zip(_TRANSLATE.value, outputs):
    print(f'  {source!r} -> {output!r}')


def print_table(step: int, results: dict[str, dict[str, float]], extra=None) -> None:
  """One row per split, one column per metric of the run's objective (any family's)."""
  names = list(dict.fromkeys(n for report in results.values() for n in report))
  width = max([10, *map(len, names)])
  first = max([22, *map(len, results)])
  print(f'\nstep {step}')
  print(f"| {'split':<{first}} | " + ' | '.join(f'{n:>{width}}' for n in names) + ' |')
  print(f"|{'-' * (first + 2)}|" + '|'.join('-' * (width + 2) for _ in names) + '|')
  for split, report in results.items():
    cells = (f'{report[n]:>{width}.4f}' if n in report else ' ' * width for n in names)
    print(f'| {split:<{first}} | ' + ' | '.join(cells) + ' |')
  for label, value in (extra or {}).items():
    print(f'{label}: {value:.4f}')


def watch(evaluator: Evaluator) -> None:
  """Evaluates every committed checkpoint as it appears; stops after the run's final step."""
  final = evaluator.config.train.num_steps
  done, last_new = set(), time.time()
  while True:
    evaluator.mngr.reload()
    # Only committed steps are listed: a `<step>.orbax-checkpoint-tmp-*` save in progress is not.
    for step in sorted(set(evaluator.mngr.all_steps()) - done):
      try:
        print_table(step, evaluator.evaluate(step, _SPLITS.value))
      except checkpoint.DamagedCheckpointError as e:
        print(f'{e}; skipping it', flush=True)
      done.add(step)
      last_new = time.time()
    if final in done:
      return
    if time.time() - last_new > _TIMEOUT.value:
      raise TimeoutError(f'no new checkpoint in {evaluator.mngr.directory} for '
                         f'{_TIMEOUT.value:.0f}s; the last evaluated was {max(done, default=None)}')
    time.sleep(_POLL.value)


def generate(evaluator: Evaluator, state) -> None:
  tok = evaluator.exp.tokenizer
  prompts = [[tok.bos_id] + tok.encode(p) for p in _PROMPT.value]
  room = evaluator.exp.model.config.max_len - max(len(p) for p in prompts)
  if room <= 0:
    raise ValueError(f'the longest prompt ({room + evaluator.exp.model.config.max_len} tokens) '
                     f'leaves no room in the model\'s context of {evaluator.exp.model.config.max_len}')
  max_new_tokens = min(_MAX_NEW.value, room)
  if max_new_tokens < _MAX_NEW.value:
    print(f'(generating {max_new_tokens} tokens: the context is '
          f'{evaluator.exp.model.config.max_len} tokens long)')
  flag_settings = {'temperature': _TEMPERATURE.value, 'k': _TOP_K.value, 'p': _TOP_P.value}
  for name in _SAMPLING.value:
    if name not in decoding.SAMPLERS:
      raise ValueError(f'--sampling: unknown sampler {name!r} (known: {sorted(decoding.SAMPLERS)})')
    # Each sampler takes only its own settings (greedy none, top_k k and temperature, ...).
    fields = {f.name for f in dataclasses.fields(decoding.SAMPLERS[name])}
    sampler = decoding.make_sampler(
        name, **{k: v for k, v in flag_settings.items() if k in fields})
    outputs = decoding.generate(
        evaluator.exp.model, state.params, prompts, jax.random.key(_SEED.value),
        max_new_tokens=max_new_tokens, sampler=sampler, eos_id=tok.eos_id, pad_id=tok.pad_id)
    print(f'\n[{name}]')
    for text, new in zip(_PROMPT.value, outputs):
      print(f'  {text!r} -> {tok.decode(list(new))!r}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  evaluator = Evaluator(_WORKDIR.value)
  if _WATCH.value:
    watch(evaluator)
    return
  steps = evaluator.mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no committed checkpoint in {evaluator.mngr.directory}')
  if _STEP.value is None:
    state, step = evaluator.restore_latest()
  else:
    step = _STEP.value
    if step not in steps:
      raise ValueError(f'--step={step} is not among the checkpoints {sorted(steps)}')
    try:
      state = evaluator.restore(step)
    except checkpoint.DamagedCheckpointError as e:
      sys.exit(f'{e}\n--step={step} cannot be evaluated; the checkpoints are {sorted(steps)}')
  results = evaluator.evaluate(step, _SPLITS.value, state=state)
  extra = {}
  if _UNIGRAM.value:
    extra['unigram baseline validation perplexity'] = baselines.unigram_perplexity(
        evaluator.batches('train'), evaluator.batches('validation'),
        evaluator.exp.tokenizer.vocab_size)
    extra['model validation perplexity'] = results['validation']['perplexity']
  task = evaluator.exp.task
  if getattr(task, 'num_classes', None) is not None:
    # The trivial baseline beside the score: the training split's majority class (or mean).
    data_dir = loop.pipeline.data_dir(evaluator.exp.data)
    for split in _SPLITS.value:
      results[f'{split} (baseline)'] = tasks.baseline(task, split, data_dir=data_dir)
  seq2seq = evaluator.exp.data.task in ('seq2seq', 'text_to_text')
  if seq2seq and _SPLITS.value:
    score_translations(evaluator, state, step, results)
  if results or extra:  # --splits= with --translate or --prompt: no table to print
    print_table(step, results, extra)
  if _TRANSLATE.value:
    if not seq2seq:
      raise ValueError(f'--translate needs a seq2seq or text_to_text run; {_WORKDIR.value} '
                       f'trains {evaluator.config.model_name} on task '
                       f'{evaluator.exp.data.task!r}')
    translate_sentences(evaluator, state)
  if _PROMPT.value:
    generate(evaluator, state)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
