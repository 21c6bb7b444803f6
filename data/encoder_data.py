"""grain iterators over the encoder tasks of data/tasks.py, shaped like data/pipeline.py's.

  task = tasks.get_task('nsp')          # or a tasks.PretrainingTask / ClassificationTask
  it = task_train_iterator(task, cfg, tok)     # endless global batches (rows=: this host's)
  batch = next(it)    # it.get_state() / it.set_state(): Orbax saves them like the LM's
  for batch in task_eval_batches(task, cfg, tok, 'validation'): ...

A batch is the task's features (see data/tasks.py) stacked to [rows, seq_len] (labels
[rows]) plus `example_weight` [rows] float32: 1 for an example, 0 for the rows that pad
the last eval batch, so every example of a split is counted exactly once.

Every host builds the same global batches of cfg.batch_size rows and keeps its own rows
(pipeline.host_rows), so batches do not depend on the number of hosts. Example i of epoch
e is built from (seed, e, i) alone, so the iterator's state is one index.

A task is a name of tasks.TASKS or any object with `name`, `mask_fn`, `dupe_factor` and
`source(cfg, tokenizer, split)` returning a source with `len()`, `tokenizer` and
`example(index, epoch, seed)` (see data/tasks.py).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator

import grain
import numpy as np

from data import pipeline
from data import tasks as tasks_lib

Batch = dict[str, np.ndarray]
# The run's seed builds training examples; evaluation examples always use this one, so
# every run is scored on the same NSP pairs.
EVAL_SEED = 0
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # see pipeline._packed_rows


def _with_weight(features: dict, weight: float) -> dict:
  return {**features, 'example_weight': np.asarray(weight, np.float32)}


def apply_static_mask(features: dict, mask_fn, seed, special_ids: np.ndarray) -> dict:
  """BERT's static masking of one example: mask_fn(inputs, maskable, word_starts, seed)
  -> (inputs, mlm_targets, mlm_weights); maskable = real tokens that are not specials."""
  maskable = (features['segment_ids'] > 0) & ~np.isin(features['inputs'], special_ids)
  inputs, targets, weights = mask_fn(features['inputs'], maskable,
                                     features['word_starts'].astype(bool), seed)
  return {**features, 'inputs': np.asarray(inputs, np.int32),
          'mlm_targets': np.asarray(targets, np.int32),
          'mlm_weights': np.asarray(weights, np.float32)}


class _TrainExample(grain.transforms.Map):
  """Global index -> example: epoch e = index // n, each epoch in its own permutation of
  the n examples drawn from (seed, e); built from (seed, copy, example), where copy is the
  epoch, or with static masking, which of the dupe_factor copies the epoch reuses."""

  def __init__(self, source, task, seed: int, special_ids: np.ndarray):
    self._source, self._task, self._seed, self._specials = source, task, seed, special_ids
    self._permutation = functools.lru_cache(maxsize=2)(self._make_permutation)

  def _make_permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self._seed, epoch)).permutation(len(self._source))

  def map(self, index):
    epoch, position = divmod(int(index), len(self._source))
    i = int(self._permutation(epoch)[position])
    mask_fn = self._task.mask_fn
    copy = epoch % max(self._task.dupe_factor, 1) if mask_fn else epoch
    features = self._source.example(i, copy, self._seed)
    if mask_fn:
      features = apply_static_mask(features, mask_fn, (self._seed, copy, i), self._specials)
    return _with_weight(features, 1.0)


class _EvalExample(grain.transforms.Map):
  """Index -> example i of the split (fixed seed, epoch 0); past the end, a weight-0 row."""

  def __init__(self, source, task, special_ids: np.ndarray):
    self._source, self._task, self._specials = source, task, special_ids

  def map(self, index):
    index = int(index)
    if index >= len(self._source):
      return _with_weight(self._padding(), 0.0)
    features = self._source.example(index, 0, EVAL_SEED)
    if self._task.mask_fn:
      features = apply_static_mask(features, self._task.mask_fn, (EVAL_SEED, 0, index),
                                   self._specials)
    return _with_weight(features, 1.0)

  @functools.cache  # pylint: disable=method-cache-max-size-none  (one per transform)
  def _padding(self) -> dict:
    # Example 0's shapes and dtypes, all zero but the pad token.
    real = self._source.example(0, 0, EVAL_SEED)
    if self._task.mask_fn:
      real = apply_static_mask(real, self._task.mask_fn, (EVAL_SEED, 0, 0), self._specials)
    pad = {k: np.zeros_like(v) for k, v in real.items()}
    pad['inputs'][:] = self._source.tokenizer.pad_id
    return pad


class _KeepRows(grain.transforms.Map):
  """global batch -> this host's rows of it."""

  def __init__(self, rows: np.ndarray):
    self._rows = rows

  def map(self, batch: Batch) -> Batch:
    return {k: v[self._rows] for k, v in batch.items()}


def _source(task, cfg: pipeline.DataConfig, tokenizer, split: str):
  source = task.source(cfg, tokenizer, split)
  if not len(source):
    raise ValueError(f'task {task.name!r}: split {split!r} holds no examples')
  if split == 'train' and cfg.train_examples:
    if cfg.train_examples < 0:
      raise ValueError(f'config.data.train_examples={cfg.train_examples} must be >= 0')
    return _Prefix(source, cfg.train_examples)
  return source


class _Prefix:
  """The first n examples of a source (config.data.train_examples): epochs then cycle
  through these alone."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def example(self, index: int, epoch: int, seed: int):
    return self._source.example(index, epoch, seed)


def task_train_iterator(task, cfg: pipeline.DataConfig, tokenizer, *, shard_index: int = 0,
                        shard_count: int = 1, rows=None,
                        split: str = 'train') -> grain.DatasetIterator:
  """Endless batches of the task's examples of `split`: this host's rows (see
  pipeline.host_rows) of each global batch of cfg.batch_size; epochs reshuffled by
  cfg.seed; get_state()/set_state() resume exactly."""
  task = tasks_lib.get_task(task)
  keep = pipeline.host_rows(cfg, shard_index=shard_index, shard_count=shard_count, rows=rows)
  source = _source(task, cfg, tokenizer, split)
  example = _TrainExample(source, task, cfg.seed, tasks_lib.special_ids(tokenizer))
  ds = grain.MapDataset.range(sys.maxsize).map(example).to_iter_dataset(_READ)
  ds = ds.batch(cfg.batch_size, drop_remainder=True)
  if not np.array_equal(keep, np.arange(cfg.batch_size)):
    ds = ds.map(_KeepRows(keep))
  return iter(ds)


class TaskEvalBatches:
  """One pass over a split in order, re-iterable: ceil(examples / batch_size) global
  batches, the last padded with weight-0 rows; each host gets its rows of each."""

  def __init__(self, task, cfg: pipeline.DataConfig, tokenizer, split: str, *,
               shard_index: int = 0, shard_count: int = 1, rows=None, max_batches: int = 0):
    self.task = tasks_lib.get_task(task)
    self._cfg, self._max_batches = cfg, max_batches
    self._rows = pipeline.host_rows(cfg, shard_index=shard_index, shard_count=shard_count,
                                    rows=rows)
    self._source = _source(self.task, cfg, tokenizer, split)
    self._example = _EvalExample(self._source, self.task, tasks_lib.special_ids(tokenizer))

  @property
  def num_examples(self) -> int:
    return len(self._source)

  def __len__(self) -> int:
    count = -(-len(self._source) // self._cfg.batch_size)
    return min(count, self._max_batches) if self._max_batches else count

  def __iter__(self) -> Iterator[Batch]:
    size = len(self) * self._cfg.batch_size
    ds = grain.MapDataset.range(size).map(self._example).to_iter_dataset(_READ)
    for batch in ds.batch(self._cfg.batch_size, drop_remainder=True):
      yield {k: v[self._rows] for k, v in batch.items()}


def task_eval_batches(task, cfg: pipeline.DataConfig, tokenizer, split: str, *,
                      shard_index: int = 0, shard_count: int = 1, rows=None,
                      max_batches: int = 0) -> TaskEvalBatches:
  """The batches of one pass over `split` ('validation' or 'test'); max_batches=0: all."""
  return TaskEvalBatches(task, cfg, tokenizer, split, shard_index=shard_index,
                         shard_count=shard_count, rows=rows, max_batches=max_batches)
