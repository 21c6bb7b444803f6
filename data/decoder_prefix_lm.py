"""Decoder-only prefix-LM rows: T5's prefix LM decoder (Raffel et al. 2020, sec. 3.2.1,
table 2), one stack reading its prefix bidirectionally and predicting the rest.

  cfg = DataConfig(name='bible/en_es', text_key='en,es', task='prefix_lm', seq_len=64)
  it = train_iterator(cfg, tokenizer)      # endless global batches (rows=: this host's)
  for batch in eval_batches(cfg, tokenizer, 'validation'): ...

The examples are those of the encoder-decoder 'prefix_lm' task (data/denoising_data.py):
the documents of `text_key` cut into chunks, chunk k of feature f of the record at place
i of the epoch-shuffled stream split at a uniform point 1..n-1 by `PrefixLMTask` with seed
(cfg.seed, i, f, k). Only the converter differs (as seqio's PrefixLMFeatureConverter
differs from its encoder-decoder one): the prefix and the continuation lie end to end in
one row of int32 features, for a GPT with mask='prefix_lm' and the 'prefix_lm' objective:

  inputs          [bos] prefix continuation [eos], then pad_id
  segment_ids     1 on the example, 0 on padding
  positions       0, 1, ... on the example, 0 on padding
  prefix_lengths  [B]: P = 1 + len(prefix), the slots read bidirectionally ([bos] is part
                  of the prefix, as it is of eval.py's prompts)
  loss_weights    1 on the slots P-1 .. L-2 (L: the example's length), whose next token is
                  a continuation token or the [eos]: the last prefix slot predicts the first
                  continuation token, and no slot is scored on a prefix token

Chunks are seq_len - 2 tokens long, so that [bos] and [eos] fit. One example per row: the
prefix-LM mask takes one prefix length per row, so rows are not packed. Records, seeds,
window shuffling, per-host rows and the checkpointable iterator state are as in
data/seq2seq_data.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from data import denoising_data
from data import pipeline

Batch = dict[str, np.ndarray]
FEATURES = ('inputs', 'segment_ids', 'positions', 'prefix_lengths', 'loss_weights')
TASK = 'prefix_lm'  # the data task whose examples a decoder-only model reads this way
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # see pipeline._packed_rows


def make_row(prefix: np.ndarray, continuation: np.ndarray, *, seq_len: int, bos_id: int,
             pad_id: int) -> dict[str, np.ndarray]:
  """One row of FEATURES from a prefix and its continuation ([eos] included)."""
  tokens = np.concatenate([[bos_id], prefix, continuation]).astype(np.int32)
  length, prefix_length = len(tokens), 1 + len(prefix)
  if length > seq_len or not len(continuation):
    raise ValueError(f'a row of {seq_len} slots cannot hold [bos], {len(prefix)} prefix and '
                     f'{len(continuation)} continuation tokens (at least one)')
  inputs = np.full(seq_len, pad_id, np.int32)
  inputs[:length] = tokens
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:length] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[:length] = np.arange(length)
  # Slot t predicts inputs[t + 1]: the continuation's tokens are predicted from the slots
  # one before them, the first from the prefix's last slot.
  loss_weights = np.zeros(seq_len, np.int32)
  loss_weights[prefix_length - 1:length - 1] = 1
  return {'inputs': inputs, 'segment_ids': segment_ids, 'positions': positions,
          'prefix_lengths': np.asarray(prefix_length, np.int32), 'loss_weights': loss_weights}


def corruption(cfg: pipeline.DataConfig, tokenizer) -> denoising_data.PrefixLMTask:
  """The encoder-decoder task's split, on chunks of seq_len - 2 tokens."""
  if cfg.task != TASK:
    raise ValueError(f'decoder-only prefix-LM rows are made from task {TASK!r}, not '
                     f'config.data.task={cfg.task!r}')
  if cfg.seq_len < 3:
    raise ValueError(f'config.data.seq_len={cfg.seq_len}: a prefix-LM row needs at least 3 '
                     'slots ([bos], a token, [eos])')
  # PrefixLMTask's chunks are inputs_length - 1 long.
  return denoising_data.PrefixLMTask(cfg.seq_len - 1, tokenizer.eos_id)


def examples(cfg: pipeline.DataConfig, tokenizer) -> denoising_data.DenoisingTask:
  """What makes the (prefix + [eos], continuation + [eos]) pairs of `cfg`'s records."""
  task = corruption(cfg, tokenizer)
  return denoising_data.DenoisingTask(task, pipeline.text_keys(cfg), tokenizer,
                                      task.targets_length, cfg.seed)


class _Row(grain.transforms.Map):
  """{'inputs': prefix + [eos], 'targets': continuation + [eos]} -> a row of FEATURES."""

  def __init__(self, seq_len: int, bos_id: int, pad_id: int):
    self._seq_len, self._bos_id, self._pad_id = seq_len, bos_id, pad_id

  def map(self, pair: dict) -> dict[str, np.ndarray]:
    # The prefix's own [eos] goes: the continuation follows the prefix as a prompt's does.
    return make_row(pair['inputs'][:-1], pair['targets'], seq_len=self._seq_len,
                    bos_id=self._bos_id, pad_id=self._pad_id)


def _rows(records: grain.MapDataset, cfg: pipeline.DataConfig, tokenizer) -> grain.IterDataset:
  return examples(cfg, tokenizer).pairs(records).map(
      _Row(cfg.seq_len, tokenizer.bos_id, tokenizer.pad_id))


def _source(cfg: pipeline.DataConfig, split: str):
  source = pipeline.data_source(cfg, split)
  if not len(source):
    raise ValueError(f'the {split} split of {cfg.files or cfg.name!r} holds no records')
  return source


def train_iterator(cfg: pipeline.DataConfig, tokenizer, *, shard_index: int = 0,
                   shard_count: int = 1, rows=None) -> grain.DatasetIterator:
  """Endless global batches of rows (this host's rows of each, pipeline.host_rows) from
  the training split, shuffled per epoch; `get_state()`/`set_state()` resume it."""
  corruption(cfg, tokenizer)  # fails here, not at the first batch, on a bad config
  keep = pipeline.host_rows(cfg, shard_index=shard_index, shard_count=shard_count, rows=rows)
  records = pipeline.EpochShuffle(grain.MapDataset.source(_source(cfg, 'train')),
                                  seed=cfg.seed)
  ds = _rows(records, cfg, tokenizer)
  if pipeline.SHUFFLE_WINDOW_ROWS > 1:
    # A long document's chunks follow each other: spread them over batches.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=pipeline.SHUFFLE_WINDOW_ROWS, seed=cfg.seed)
  ds = ds.batch(cfg.batch_size, drop_remainder=True)
  if not np.array_equal(keep, np.arange(cfg.batch_size)):
    ds = ds.map(pipeline.KeepRows(keep))
  return iter(ds)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """All-zero rows (segment id 0, weight 0) up to `rows`, for features of any rank."""
  return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


class EvalBatches:
  """One pass over a split in order, re-iterable; the last batch is padded with all-zero
  rows (no weight)."""

  def __init__(self, cfg: pipeline.DataConfig, tokenizer, split: str, *, shard_index: int = 0,
               shard_count: int = 1, rows=None, max_batches: int = 0):
    corruption(cfg, tokenizer)
    self._cfg, self._tokenizer, self._max_batches = cfg, tokenizer, max_batches
    self._rows = pipeline.host_rows(cfg, shard_index=shard_index, shard_count=shard_count,
                                    rows=rows)
    self._records = grain.MapDataset.source(_source(cfg, split))

  def __iter__(self) -> Iterator[Batch]:
    cfg = self._cfg
    ds = _rows(self._records, cfg, self._tokenizer)
    for count, batch in enumerate(ds.batch(cfg.batch_size, drop_remainder=False)):
      if self._max_batches and count >= self._max_batches:
        return
      yield {k: _pad_rows(batch[k], cfg.batch_size)[self._rows] for k in FEATURES}


def eval_batches(cfg: pipeline.DataConfig, tokenizer, split: str, **kwargs) -> EvalBatches:
  """The batches of one pass over `split`; kwargs as `EvalBatches`."""
  return EvalBatches(cfg, tokenizer, split, **kwargs)
