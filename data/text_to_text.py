"""Text-to-text tasks (T5, Raffel et al. 2020 §2.4): every task reads text and writes text,
its inputs opened by a prefix that names the task, so one encoder-decoder learns several
tasks from one stream and is evaluated on each with the task's own metric.

  cfg = DataConfig(task='text_to_text', mixture='translate,modernize,genre',
                   mixing='proportional', mixing_cap=0, seq_len=64, targets_len=64, ...)
  it = train_iterator(cfg, tokenizer)               # the mixture, packed as seq2seq pairs
  batches = eval_batches(cfg, tokenizer, 'validation')
  for task in mixture_tasks(cfg):
    texts = examples(cfg, task, 'test')             # [{'inputs', 'targets', 'source'}]

Tasks are named in `TASKS` (a frozen `Task` each): a dataset, the feature read as the
source and the one written as the target, a prefix, the metrics and a baseline. A record of
a task is {'inputs': prefix + source text, 'targets': target text, 'source': source text}.

Mixing (`cfg.mixing`): 'proportional' is T5's examples-proportional mixing, task k at the
rate min(n_k, K) / Σ_j min(n_j, K) with n_k its training examples and K = `cfg.mixing_cap`
(0: no cap); or explicit weights 'translate=1,modernize=3' (normalised; every task of the
mixture named once). ',' and '+' both separate items, so the weights fit inside a
`--config=...:mixing=translate=1+modernize=3` argument. The stream is deterministic, not
sampled: element k comes from the task whose count falls behind its rate (`interleave`,
grain's MapDataset.mix schedule with exact integer proportions), so among any first k
elements each task has k · rate of them within one per task; each task's records run
through endless epochs of their own permutation (pipeline.EpochShuffle, seeded by
(cfg.seed, the task's place in the mixture)). The iterator's state is one index, so a
resumed run reads the same batches.

Evaluation: a split's loss is over every task's examples of the split, each once, laid out
evenly by the same schedule with the split sizes as proportions (so `train.eval_batches`
sees every task in proportion). Generation metrics are per task (training/translation.py).

The tokenizer (no `tokenizer_path`): one sentencepiece vocabulary trained on the prefixed
inputs and the targets of every task's training split (pipeline.load_tokenizer, cached as
`text_to_text-<sorted task names>_<kind>_<size>`); a fine-tuning run instead keeps its
pretraining run's with `tokenizer_path` (configs/text_to_text.py).
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

import grain
import numpy as np

from data import pipeline
from data import seq2seq_data
from data import tasks as tasks_lib

# Generation metrics score detokenised text (training/translation.py `scores`); 'accuracy'
# is the share of outputs equal to the target (a classification written as text).
METRICS = ('bleu', 'chrf', 'rouge', 'accuracy')
# What the model is compared with: 'copy' writes the source unchanged, 'majority' the most
# frequent target of the training split.
BASELINES = ('copy', 'majority')
KEYS = ('inputs', 'targets')  # the record features that make a pair


@dataclasses.dataclass(frozen=True)
class Task:
  """A text-to-text task: `dataset`'s `source_key` feature (prefixed) -> its `target_key`.

  `examples(data_dir, split) -> [dict]` builds the records from the dataset instead of
  reading them (a label made into a word); otherwise the TFDS dataset's records are read.
  """
  name: str
  dataset: str
  source_key: str
  target_key: str
  prefix: str
  metrics: tuple[str, ...]
  baseline: str = 'copy'
  examples: Callable[[str, str], list[dict]] | None = None

  def __post_init__(self):
    unknown = [m for m in self.metrics if m not in METRICS]
    if not self.metrics or unknown:
      raise ValueError(f'task {self.name!r}: metrics {self.metrics} must be some of {METRICS}')
    if self.baseline not in BASELINES:
      raise ValueError(f'task {self.name!r}: baseline {self.baseline!r} is not one of '
                       f'{BASELINES}')


def genre_examples(data_dir: str, split: str) -> list[dict]:
  """data/tasks.py's genre examples (a WEB verse, its book's genre) with the genre as a
  word: {'sentence': verse, 'genre': 'law' | 'history' | ...}."""
  return [{'sentence': e['sentence'], 'genre': tasks_lib.GENRES[e['label']]}
          for e in tasks_lib.TASKS['genre'].split_examples(data_dir, split)]


TASKS = {t.name: t for t in (
    Task('translate', 'bible/en_es', 'en', 'es', 'translate English to Spanish: ',
         ('bleu', 'chrf')),
    Task('translate_es_en', 'bible/en_es', 'es', 'en', 'translate Spanish to English: ',
         ('bleu', 'chrf')),
    Task('modernize', 'bible/kjv_web', 'kjv', 'web', 'modernize: ', ('bleu', 'chrf', 'rouge')),
    Task('genre', 'bible/kjv_web', 'sentence', 'genre', 'genre: ', ('accuracy',),
         baseline='majority', examples=genre_examples),
)}


def _items(text: str) -> list[str]:
  return [item.strip() for item in re.split(r'[,+]', text) if item.strip()]


def get(name: str) -> Task:
  """A task by name (`TASKS`)."""
  if name not in TASKS:
    raise ValueError(f'unknown text-to-text task {name!r} in config.data.mixture; one of '
                     f'{", ".join(TASKS)}')
  return TASKS[name]


def mixture_tasks(cfg: pipeline.DataConfig) -> tuple[Task, ...]:
  """The tasks `cfg.mixture` names, in its order."""
  names = _items(cfg.mixture)
  if not names:
    raise ValueError("config.data.mixture must name text-to-text tasks for task "
                     f"'text_to_text' (e.g. 'translate,modernize'; known: {', '.join(TASKS)})")
  repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
  if repeated:
    raise ValueError(f'config.data.mixture={cfg.mixture!r} names {repeated} more than once')
  return tuple(get(name) for name in names)


def slug(cfg: pipeline.DataConfig) -> str:
  """The name of the mixture's vocabulary: the same for any order and rates of its tasks."""
  return 'text_to_text-' + '-'.join(sorted(t.name for t in mixture_tasks(cfg)))


# ---------------------------------------------------------------------------------------
# Records of one task.

def task_config(cfg: pipeline.DataConfig, task: Task) -> pipeline.DataConfig:
  """`cfg` reading the task's dataset as a seq2seq pair (what pipeline.data_source reads)."""
  return dataclasses.replace(cfg, task='seq2seq', name=task.dataset, files='',
                             source_key=task.source_key, target_key=task.target_key,
                             mixture='')


class _Prefixed(grain.transforms.Map):
  """dataset record -> {'inputs': prefix + source, 'targets': target, 'source': source}."""

  def __init__(self, task: Task):
    self._task = task

  def map(self, record):
    text = pipeline._text  # pylint: disable=protected-access
    source = text(record, self._task.source_key)
    return {'inputs': self._task.prefix + source, 'source': source,
            'targets': text(record, self._task.target_key)}


def records(cfg: pipeline.DataConfig, task: Task, split: str) -> grain.MapDataset:
  """The task's records of a split, in the dataset's order."""
  if task.examples is not None:
    source = task.examples(os.fspath(pipeline.data_dir(cfg)), split)
    for key in (task.source_key, task.target_key) if source else ():
      if key not in source[0]:
        raise KeyError(f'task {task.name!r}: its examples have no feature {key!r}')
  else:
    source = pipeline.data_source(task_config(cfg, task), split)
  if not len(source):
    raise ValueError(f'task {task.name!r}: the {split} split of {task.dataset!r} holds no '
                     'records')
  return grain.MapDataset.source(source).map(_Prefixed(task))


def examples(cfg: pipeline.DataConfig, task: Task, split: str, max_examples: int = 0
             ) -> list[dict[str, str]]:
  """The first `max_examples` records of a split (0: all): what the task's metrics score."""
  ds = records(cfg, task, split)
  count = min(len(ds), max_examples) if max_examples else len(ds)
  return [ds[i] for i in range(count)]


def majority_target(cfg: pipeline.DataConfig, task: Task) -> str:
  """The most frequent target of the training split (the first in sorted order on a tie)."""
  counts = collections.Counter(r['targets'] for r in examples(cfg, task, 'train'))
  return min(counts, key=lambda t: (-counts[t], t))


def tokenizer_texts(cfg: pipeline.DataConfig):
  """The texts a mixture's own vocabulary is trained on: every task's prefixed inputs and
  targets, evenly spaced records up to pipeline.TOKENIZER_RECORDS in all."""
  tasks = mixture_tasks(cfg)
  per_task = max(1, pipeline.TOKENIZER_RECORDS // len(tasks))
  for task in tasks:
    ds = records(cfg, task, 'train')
    for i in range(0, len(ds), max(1, len(ds) // per_task)):
      record = ds[i]
      yield record['inputs']
      yield record['targets']


# ---------------------------------------------------------------------------------------
# Mixing.

def proportions(cfg: pipeline.DataConfig, sizes: Sequence[int]) -> tuple[int, ...]:
  """Integer proportions of the mixture's tasks (training examples `sizes`, in the
  mixture's order), reduced by their common divisor: exact rates, no float rounding."""
  tasks = mixture_tasks(cfg)
  if len(sizes) != len(tasks):
    raise ValueError(f'{len(sizes)} sizes for the {len(tasks)} tasks of the mixture')
  if cfg.mixing == 'proportional':
    if cfg.mixing_cap < 0:
      raise ValueError(f'config.data.mixing_cap={cfg.mixing_cap} must be >= 0 (0: no cap)')
    weights = [min(n, cfg.mixing_cap) if cfg.mixing_cap else n for n in sizes]
  else:
    weights = _explicit_weights(cfg, tasks)
  if not all(w > 0 for w in weights):
    raise ValueError(f'config.data.mixing={cfg.mixing!r}: every task needs a positive rate, '
                     f'got {dict(zip((t.name for t in tasks), map(str, weights)))}')
  divisor = math.gcd(*weights)
  return tuple(w // divisor for w in weights)


def _explicit_weights(cfg: pipeline.DataConfig, tasks: Sequence[Task]) -> list[int]:
  """'translate=1,modernize=3' -> [1, 3] in the mixture's order (decimals made exact)."""
  given = {}
  for item in _items(cfg.mixing):
    name, sep, value = item.partition('=')
    try:
      given[name.strip()] = fractions.Fraction(value.strip()) if sep else None
    except ValueError:
      given[name.strip()] = None
    if given[name.strip()] is None:
      raise ValueError(f"config.data.mixing={cfg.mixing!r} is neither 'proportional' nor "
                       "weights 'task=weight,...' (e.g. 'translate=1,modernize=3')")
  names = [t.name for t in tasks]
  if set(given) != set(names):
    raise ValueError(f'config.data.mixing={cfg.mixing!r} must weigh exactly the tasks of '
                     f'config.data.mixture ({", ".join(names)})')
  scale = math.lcm(*(given[n].denominator for n in names))
  return [int(given[n] * scale) for n in names]


def rates(cfg: pipeline.DataConfig, sizes: Sequence[int]) -> dict[str, float]:
  """Each task's share of the training stream."""
  weights = proportions(cfg, sizes)
  return {t.name: w / sum(weights) for t, w in zip(mixture_tasks(cfg), weights)}


def interleave(k: int, weights: Sequence[int]) -> tuple[int, int]:
  """(task, its element) at place k of the stream that gives task i a share
  weights[i] / Σ weights: task 0 owns the places where its count ⌈k · w0 / W⌉ steps up;
  the other places go to the remaining tasks by the same rule (grain's mix schedule)."""
  remaining, k0, k1 = sum(weights), k, k + 1
  for i, w in enumerate(weights):
    # Among the first k0 (k1) places left to tasks i.., the ones tasks i+1.. take.
    rest0, rest1 = k0 * (remaining - w) // remaining, k1 * (remaining - w) // remaining
    if k1 - rest1 != k0 - rest0:
      return i, k1 - rest1 - 1
    remaining, k0, k1 = remaining - w, rest0, rest1
  raise AssertionError(f'place {k} fell to no task of weights {weights}')


class Mixture(grain.MapDataset):
  """The parents' elements at the rates of `weights` (`interleave`), `length` in all."""

  def __init__(self, parents: Sequence[grain.MapDataset], weights: Sequence[int], length: int):
    super().__init__(list(parents))
    if len(weights) != len(parents) or not all(w > 0 for w in weights):
      raise ValueError(f'weights {list(weights)} for {len(parents)} parents')
    self._weights, self._length = tuple(int(w) for w in weights), length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    task, element = interleave(int(index), self._weights)
    return self._parents[task][element]

  def __str__(self) -> str:
    return f'Mixture(weights={self._weights})'


def task_seed(seed: int, place: int) -> int:
  """The shuffling seed of the task at `place` in the mixture."""
  return int(np.random.SeedSequence([seed, place]).generate_state(1)[0])


def training_stream(cfg: pipeline.DataConfig) -> Mixture:
  """The endless mixture of the tasks' training records, each task shuffled per epoch."""
  tasks = mixture_tasks(cfg)
  parts = [records(cfg, task, 'train') for task in tasks]
  weights = proportions(cfg, [len(p) for p in parts])
  shuffled = [pipeline.EpochShuffle(p, seed=task_seed(cfg.seed, i)) for i, p in enumerate(parts)]
  return Mixture(shuffled, weights, sys.maxsize)


def split_stream(cfg: pipeline.DataConfig, split: str) -> Mixture:
  """Every task's records of a split, each once, spread evenly over the pass."""
  parts = [records(cfg, task, split) for task in mixture_tasks(cfg)]
  sizes = [len(p) for p in parts]
  return Mixture(parts, sizes, sum(sizes))


def train_iterator(cfg: pipeline.DataConfig, tokenizer, **kwargs) -> grain.DatasetIterator:
  """Endless packed batches of the mixture; kwargs as seq2seq_data.train_iterator."""
  return seq2seq_data.train_iterator(cfg, tokenizer, records=training_stream(cfg),
                                     task=seq2seq_data.TextPairs(tokenizer, cfg, KEYS),
                                     **kwargs)


def eval_batches(cfg: pipeline.DataConfig, tokenizer, split: str,
                 **kwargs) -> seq2seq_data.EvalBatches:
  """One pass over every task's examples of `split`; kwargs as seq2seq_data.EvalBatches."""
  return seq2seq_data.EvalBatches(cfg, tokenizer, split, records=split_stream(cfg, split),
                                  task=seq2seq_data.TextPairs(tokenizer, cfg, KEYS), **kwargs)
