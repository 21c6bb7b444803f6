"""Sequence pairs for encoder-decoders: a source feature and a target feature of any
dataset (bible/en_es, bible/kjv_web, a TFDS translation dataset, the user's line-aligned
files), tokenized with one joint vocabulary and packed each side on its own.

  cfg = DataConfig(name='bible/en_es', task='seq2seq', source_key='en', target_key='es',
                   seq_len=64, targets_len=64, ...)
  it = train_iterator(cfg, tokenizer)      # endless global batches (rows=: this host's)
  for batch in eval_batches(cfg, tokenizer, 'validation'): ...
  pairs = pair_texts(cfg, 'test')          # the raw (source, target) texts, for BLEU

A batch holds int32 arrays, [rows, S] for the source and [rows, T] for the target:
  inputs, inputs_segment_ids, inputs_positions        source tokens + [eos]
  targets, targets_segment_ids, targets_positions     target tokens + [eos]
  decoder_inputs                                      the targets shifted right within
                                                      each segment, [bos] at its start
Examples are packed first-fit into rows as t5x/seqio pack encoder-decoder features: an
example joins a row only where both its sides fit, and its k-th place in the row gives
segment id k on both sides, so target segment k reads source segment k alone. A side
longer than its row is cut (keeping its [eos]). Segment id 0 is padding.

As data/pipeline.py: records shuffled per epoch by (seed, epoch), every host packs the same
global batches and keeps its own rows, and the iterator's state is checkpointable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import grain
import numpy as np

from data import pipeline

Batch = dict[str, np.ndarray]
FEATURES = ('inputs', 'inputs_segment_ids', 'inputs_positions', 'targets',
            'targets_segment_ids', 'targets_positions', 'decoder_inputs')
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # see pipeline._packed_rows


def lengths(cfg: pipeline.DataConfig) -> tuple[int, int]:
  """(S, T): the source's and the target's row lengths."""
  return cfg.seq_len, cfg.targets_len or cfg.seq_len


def encode(tokenizer, text: str, length: int) -> np.ndarray:
  """ids + [eos], cut to `length` with the [eos] kept: int32 [<= length]."""
  ids = tokenizer.encode(text)[:length - 1]
  return np.asarray([*ids, tokenizer.eos_id], np.int32)


def shift_right(targets_BT: np.ndarray, positions_BT: np.ndarray, segment_ids_BT: np.ndarray,
                bos_id: int) -> np.ndarray:
  """Decoder inputs: each token's predecessor in its own segment, [bos] where a segment
  starts (position 0), 0 on padding."""
  previous_BT = np.pad(targets_BT, ((0, 0), (1, 0)))[:, :-1]
  shifted_BT = np.where(positions_BT == 0, bos_id, previous_BT)
  return np.where(segment_ids_BT != 0, shifted_BT, 0).astype(np.int32)


class _TokenizePair(grain.transforms.Map):
  """record -> {'inputs': source ids + [eos], 'targets': target ids + [eos]}."""

  def __init__(self, tokenizer, cfg: pipeline.DataConfig, keys: tuple[str, str] | None = None):
    self._tokenizer = tokenizer
    self._keys = keys or pipeline.text_keys(cfg)
    self._lengths = lengths(cfg)

  def map(self, record):
    (source_key, target_key), (source_len, target_len) = self._keys, self._lengths
    return {'inputs': encode(self._tokenizer, pipeline._text(record, source_key), source_len),
            'targets': encode(self._tokenizer, pipeline._text(record, target_key), target_len)}


class _DecoderInputs(grain.transforms.Map):
  """packed row -> the batch features, with the shifted targets."""

  def __init__(self, bos_id: int):
    self._bos_id = bos_id

  def map(self, packed: dict) -> Batch:
    row = {k: np.asarray(packed[k], np.int32) for k in FEATURES if k != 'decoder_inputs'}
    row['decoder_inputs'] = shift_right(
        row['targets'][None], row['targets_positions'][None], row['targets_segment_ids'][None],
        self._bos_id)[0]
    return row


class PairTask(Protocol):
  """What turns records into unpacked pairs: translation pairs (`TextPairs`), or the
  corrupted documents of encoder-decoder pretraining (data/denoising_data.py)."""

  def lengths(self) -> tuple[int, int]:
    """(S, T): the source's and the target's row lengths."""

  def pairs(self, records: grain.MapDataset) -> grain.IterDataset:
    """records (index i of the stream: a record's place in it) -> {'inputs', 'targets'}."""


class TextPairs:
  """The source and target features of each record, tokenized (`keys`, default
  (`cfg.source_key`, `cfg.target_key`))."""

  def __init__(self, tokenizer, cfg: pipeline.DataConfig, keys: tuple[str, str] | None = None):
    self._tokenizer, self._cfg, self._keys = tokenizer, cfg, keys

  def lengths(self) -> tuple[int, int]:
    return lengths(self._cfg)

  def pairs(self, records: grain.MapDataset) -> grain.IterDataset:
    return records.map(_TokenizePair(self._tokenizer, self._cfg, self._keys)).to_iter_dataset(
        _READ)


def _packed_rows(records: grain.MapDataset, tokenizer, cfg: pipeline.DataConfig,
                 task: PairTask) -> grain.IterDataset:
  """records -> packed rows of both sides (dicts of FEATURES)."""
  source_len, target_len = task.lengths()
  # One batch worth of open rows, as pipeline._packed_rows: little padding, and rows stay
  # close to the order of the shuffled records.
  ds = grain.experimental.FirstFitPackIterDataset(
      task.pairs(records), length_struct={'inputs': source_len, 'targets': target_len},
      num_packing_bins=cfg.batch_size, shuffle_bins=False)
  return ds.map(_DecoderInputs(tokenizer.bos_id))


def _source(cfg: pipeline.DataConfig, split: str):
  source = pipeline.data_source(cfg, split)
  if not len(source):
    raise ValueError(f'the {split} split of {cfg.files or cfg.name!r} holds no records')
  return source


def train_iterator(cfg: pipeline.DataConfig, tokenizer, *, shard_index: int = 0,
                   shard_count: int = 1, rows=None, task: PairTask | None = None,
                   records: grain.MapDataset | None = None) -> grain.DatasetIterator:
  """Endless global batches of packed pairs (this host's rows of each, pipeline.host_rows);
  `task` makes the pairs (default: `TextPairs`) of `records`, an endless stream (default:
  the training split, shuffled per epoch)."""
  keep = pipeline.host_rows(cfg, shard_index=shard_index, shard_count=shard_count, rows=rows)
  if records is None:
    records = pipeline.EpochShuffle(grain.MapDataset.source(_source(cfg, 'train')),
                                    seed=cfg.seed)
  ds = _packed_rows(records, tokenizer, cfg, task or TextPairs(tokenizer, cfg))
  if pipeline.SHUFFLE_WINDOW_ROWS > 1:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=pipeline.SHUFFLE_WINDOW_ROWS, seed=cfg.seed)
  ds = ds.batch(cfg.batch_size, drop_remainder=True)
  if not np.array_equal(keep, np.arange(cfg.batch_size)):
    ds = ds.map(pipeline.KeepRows(keep))
  return iter(ds)


class EvalBatches:
  """One pass over a split in order, packed as in training, re-iterable; the last batch
  is padded with all-zero rows (segment id 0: no weight). `records` replaces the split's
  own (then `split` only names them)."""

  def __init__(self, cfg: pipeline.DataConfig, tokenizer, split: str, *, shard_index: int = 0,
               shard_count: int = 1, rows=None, max_batches: int = 0,
               task: PairTask | None = None, records: grain.MapDataset | None = None):
    self._cfg, self._tokenizer, self._max_batches = cfg, tokenizer, max_batches
    self._task = task or TextPairs(tokenizer, cfg)
    self._rows = pipeline.host_rows(cfg, shard_index=shard_index, shard_count=shard_count,
                                    rows=rows)
    self._records = records if records is not None else grain.MapDataset.source(
        _source(cfg, split))

  def __iter__(self) -> Iterator[Batch]:
    cfg = self._cfg
    ds = _packed_rows(self._records, self._tokenizer, cfg, self._task)
    for count, batch in enumerate(ds.batch(cfg.batch_size, drop_remainder=False)):
      if self._max_batches and count >= self._max_batches:
        return
      yield {k: pipeline._pad_rows(batch[k], cfg.batch_size)[self._rows] for k in FEATURES}


def eval_batches(cfg: pipeline.DataConfig, tokenizer, split: str, **kwargs) -> EvalBatches:
  """The batches of one pass over `split`; kwargs as `EvalBatches`."""
  return EvalBatches(cfg, tokenizer, split, **kwargs)


def pair_texts(cfg: pipeline.DataConfig, split: str, max_examples: int = 0
               ) -> list[tuple[str, str]]:
  """(source, target) texts of a split in order: what translation metrics score."""
  source = _source(cfg, split)
  source_key, target_key = pipeline.text_keys(cfg)
  count = min(len(source), max_examples) if max_examples else len(source)
  return [(pipeline._text(source[i], source_key), pipeline._text(source[i], target_key))
          for i in range(count)]


def source_rows(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """One source per row, as training encodes it: (tokens [N, S], segment ids [N, S])."""
  tokens = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  segment_ids = np.zeros((len(texts), length), np.int32)
  for row, text in enumerate(texts):
    ids = encode(tokenizer, text, length)
    tokens[row, :len(ids)], segment_ids[row, :len(ids)] = ids, 1
  return tokens, segment_ids
