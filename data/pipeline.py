"""grain pipelines: TFDS or local text -> tokens -> packed rows of seq_len -> batches.

Every batch is a dict of int32 numpy arrays of shape [rows, seq_len]:
  inputs       token ids; each document is [bos] + ids + [eos]
  segment_ids  1, 2, ... for the documents packed into a row; 0 marks padding
  positions    position within the document, restarting at 0 for each one
A document longer than seq_len is cut into chunks of seq_len, each packed as a document of
its own, so no token is lost. Models mask attention across segments and restart position
embeddings with `positions`.

  cfg = DataConfig(**config.data)
  tok = load_tokenizer(cfg)
  it = train_iterator(cfg, tok)  # global batches; with rows=..., one host's rows of them
  batch = next(it)   # it.get_state() / it.set_state(): Orbax saves them (training/checkpoint.py)

Several hosts: every host packs the same global batches of batch_size rows and keeps only
its own rows, so a run's batches do not depend on how many hosts feed it (see
`train_iterator`; training/loop.py derives each host's rows from the batch sharding).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from data import subword
from data import text_files
from data import tokenizer as tokenizer_lib
from data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
FEATURES = ('inputs', 'segment_ids', 'positions')
# Packed rows are shuffled in windows of this many rows: a long document (a Bible chapter
# is ~1000 tokens) fills many consecutive rows, which would otherwise share a batch.
# 0 or 1 turns the window off (tests do, to see the packed stream in order).
SHUFFLE_WINDOW_ROWS = 1024
# At most this many training records are read to train a tokenizer.
TOKENIZER_RECORDS = 200_000
# Encoder-decoder pretraining tasks (data/denoising_data.py), which read `text_key`.
DENOISING_TASKS = ('span_corruption', 'prefix_lm', 'mlm_denoising', 'bart_denoising')
PREPARE_HINT = 'Prepare it with `make data` or `python -m data.prepare --data_dir=DIR`.'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` block of a config (see configs/gpt.py for what each field means)."""
  name: str = 'bible/en'
  text_key: str = 'text'
  files: str = ''
  data_dir: str = ''
  tokenizer: str = 'bpe'
  vocab_size: int = 512
  seq_len: int = 32
  batch_size: int = 8
  seed: int = 0
  # What rows are made of: 'lm' packs documents for language models (this module);
  # any other name is a task of data/tasks.py (nsp, full_sentences, paraphrase, glue/...)
  # whose examples data/encoder_data.py batches; 'seq2seq' pairs `source_key` with
  # `target_key` for encoder-decoders (data/seq2seq_data.py).
  task: str = 'lm'
  source_key: str = ''   # seq2seq: the feature read as the source, e.g. 'en'
  target_key: str = ''   # seq2seq: the feature read as the target, e.g. 'es'
  targets_len: int = 0   # seq2seq: target row length (0: seq_len, the source's)
  # Published tokenizer files (tokenizer.json | vocab.txt | vocab.json + merges.txt) to
  # load instead of training one; for the wordpiece and byte_bpe tokenizers.
  tokenizer_path: str = ''
  # Masked LM: 0 draws masks on device at every step (dynamic, RoBERTa); k > 0 fixes k
  # masks per example in the pipeline, used in turn by the epochs (static, BERT's
  # dupe_factor).
  dupe_factor: int = 0
  # Tasks: train on the first k examples of the training split only (0: all), e.g. to
  # repeat a small corpus for many epochs, as a static-masking study needs.
  train_examples: int = 0
  # Encoder-decoder pretraining (data/denoising_data.py): the tasks span_corruption,
  # prefix_lm, mlm_denoising (T5's comparison) and bart_denoising corrupt the documents of
  # `text_key`, which may name several features ('en,es': each is a document of its own).
  noise_density: float = 0.15  # span_corruption, mlm_denoising: the share of tokens noised
  mean_span_length: float = 3.0  # span_corruption
  extra_ids: int = 0  # sentinels: ids above the tokenizer's (model vocab = tokenizer + these)
  noising: str = 'infill=0.3,permute'  # bart_denoising: data/bart_noising.parse
  # Text-to-text (data/text_to_text.py, task='text_to_text'): tasks of its registry mixed
  # into one training stream, each with its own prefix and metrics.
  mixture: str = ''  # task names, comma-separated: 'translate,modernize,genre'
  mixing: str = 'proportional'  # examples-proportional, or weights 'translate=1,modernize=3'
  mixing_cap: int = 0  # proportional: a task counts at most this many examples (T5's K; 0: all)


def data_dir(cfg: DataConfig) -> pathlib.Path:
  """cfg.data_dir, else $CONTEXTUAL_DATA_DIR, else ./.data."""
  return pathlib.Path(cfg.data_dir or os.environ.get('CONTEXTUAL_DATA_DIR') or '.data')


def text_keys(cfg: DataConfig) -> tuple[str, ...]:
  """The features holding text: seq2seq's source and target, else `text_key`."""
  if cfg.task in DENOISING_TASKS:
    keys = tuple(k.strip() for k in cfg.text_key.split(','))
    if not all(keys):
      raise ValueError(f'config.data.text_key={cfg.text_key!r} must name features, '
                       "comma-separated (e.g. 'en,es')")
    return keys
  if cfg.task == 'seq2seq':
    for name in ('source_key', 'target_key'):
      if not getattr(cfg, name):
        raise ValueError(f"config.data.{name} must name a feature of {cfg.files or cfg.name!r}"
                         " for task 'seq2seq'")
    return (cfg.source_key, cfg.target_key)
  return (cfg.text_key,)


def dataset_slug(cfg: DataConfig) -> str:
  """A file-name-safe name of the dataset and text features, e.g. 'bible_en_es-en'; a
  seq2seq pair's joint vocabulary is named by both, e.g. 'bible_en_es-en-es'."""
  if cfg.task == 'text_to_text':  # a vocabulary of the mixture's tasks, whatever cfg.name
    from data import text_to_text  # pylint: disable=g-import-not-at-top  (imports this module)
    return text_to_text.slug(cfg)
  base = text_files.slug(cfg.files) if cfg.files else cfg.name.replace('/', '_')
  base = base.replace(':', '-')
  keys = text_keys(cfg)
  return base if keys == ('text',) else '-'.join((base, *keys))


def data_source(cfg: DataConfig, split: str):
  """A random-access source of one split: the user's files or a prepared TFDS dataset."""
  if cfg.files:
    builder = text_files.builder(cfg.files, data_dir(cfg))
    builder.download_and_prepare()
    if split not in builder.info.splits:
      raise ValueError(f'{cfg.files}: split {split!r} is empty (the corpus is too small to '
                       'hold out lines for it); add a file for it, e.g. test.txt')
    source = builder.as_data_source(split=split)
  else:
    import data.bible  # pylint: disable=g-import-not-at-top,unused-import  (registers `bible`)
    # The WMT builders (wmt14_translate, wmt_t2t_translate, ...) register on import only.
    import tensorflow_datasets.translate  # pylint: disable=g-import-not-at-top,unused-import
    try:
      tfds.builder_cls(cfg.name.split('/')[0].split(':')[0])
    except tfds.core.DatasetNotFoundError:
      raise ValueError(f'unknown dataset {cfg.name!r}: neither ours (bible/en, bible/en_es, '
                       'bible/kjv_web) nor in the TFDS catalog; for your own text files '
                       'set data.files instead') from None
    try:
      source = tfds.data_source(cfg.name, split=split, data_dir=os.fspath(data_dir(cfg)),
                                download=False)
    except Exception as e:  # TFDS raises several kinds for 'not prepared'
      raise FileNotFoundError(f'dataset {cfg.name!r} (split {split!r}) is not prepared in '
                              f'{data_dir(cfg)}: {e}\n{PREPARE_HINT} Catalog datasets: '
                              f'tfds.builder({cfg.name!r}, data_dir=DIR, file_format='
                              "'array_record').download_and_prepare().") from e
  for key in text_keys(cfg) if len(source) else ():
    if key not in source[0]:
      field = 'text_key' if cfg.task != 'seq2seq' else (
          'source_key' if key == cfg.source_key else 'target_key')
      raise KeyError(f'dataset {cfg.files or cfg.name!r} has no feature {key!r}; '
                     f'config.data.{field} must be one of {sorted(source[0])}')
  return source


def _text(record: dict, key: str) -> str:
  value = record[key]
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def load_tokenizer(cfg: DataConfig) -> Tokenizer | subword.SubwordTokenizer:
  """The tokenizer of cfg: published files in cfg.tokenizer_path, else trained on the
  training split and cached on first use.

  'bpe' and 'unigram' are sentencepiece models (GPT); 'wordpiece' (BERT) and 'byte_bpe'
  (RoBERTa) come from data/subword.py.
  """
  stem = f'{dataset_slug(cfg)}_{cfg.tokenizer}_{cfg.vocab_size}'
  cache = data_dir(cfg) / 'tokenizers'

  def texts():
    # SentencePiece samples _INPUT_SENTENCE_SIZE lines anyway; reading a catalog corpus of
    # millions of records one by one would take far longer than training, so take an
    # evenly spaced subset of at most TOKENIZER_RECORDS. A seq2seq pair trains one joint
    # vocabulary on both sides.
    if cfg.task == 'text_to_text':  # the prefixed inputs and the targets of every task
      from data import text_to_text  # pylint: disable=g-import-not-at-top  (imports this module)
      return text_to_text.tokenizer_texts(cfg)
    source = data_source(cfg, 'train')
    step = max(1, len(source) // TOKENIZER_RECORDS)
    return (_text(source[i], key) for i in range(0, len(source), step)
            for key in text_keys(cfg))

  if cfg.tokenizer in subword.KINDS:
    return subword.load_or_train(cfg.tokenizer, cache / f'{stem}.json', texts, cfg.vocab_size,
                                 pretrained=cfg.tokenizer_path)
  if cfg.tokenizer_path:
    # A sentencepiece model of another run (a pretraining run whose vocabulary a
    # fine-tuning run on other data must keep).
    if not os.path.isfile(cfg.tokenizer_path):
      raise FileNotFoundError(f'config.data.tokenizer_path={cfg.tokenizer_path!r}: no such '
                              f'file (a sentencepiece .model for tokenizer={cfg.tokenizer!r})')
    tokenizer = Tokenizer.load(cfg.tokenizer_path)
    if tokenizer.vocab_size != cfg.vocab_size:
      raise ValueError(f'config.data.tokenizer_path={cfg.tokenizer_path!r} holds '
                       f'{tokenizer.vocab_size} pieces, but config.data.vocab_size='
                       f'{cfg.vocab_size}')
    return tokenizer
  return tokenizer_lib.get_or_train(cache / f'{stem}.model', texts, model_type=cfg.tokenizer,
                                    vocab_size=cfg.vocab_size)


# ---------------------------------------------------------------------------------------
# Transformations (small classes so that grain can name them and pickle them).

class _Tokenize(grain.transforms.Map):
  """record -> [bos] + ids + [eos] as int32."""

  def __init__(self, tokenizer: Tokenizer, key: str):
    self._tokenizer, self._key = tokenizer, key

  def map(self, record):
    ids = self._tokenizer.encode(_text(record, self._key))
    t = self._tokenizer
    return np.asarray([t.bos_id, *ids, t.eos_id], dtype=np.int32)


class _Chunk(grain.experimental.FlatMapTransform):
  """tokens -> [{'inputs': chunk}, ...], chunks of at most seq_len (the last may be short)."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len
    self.max_fan_out = 1 << 20  # only consulted by the MapDataset flavour; documents vary

  def flat_map(self, tokens):
    return [{'inputs': tokens[i:i + self._seq_len]}
            for i in range(0, len(tokens), self._seq_len)]


def _rename(packed: dict) -> Batch:
  return {'inputs': packed['inputs'].astype(np.int32),
          'segment_ids': packed['inputs_segment_ids'].astype(np.int32),
          'positions': packed['inputs_positions'].astype(np.int32)}


def _packed_rows(ds: grain.MapDataset, tokenizer: Tokenizer, cfg: DataConfig,
                 bins: int) -> grain.IterDataset:
  """records -> packed rows of seq_len (dicts of FEATURES)."""
  # Synchronous reads: grain's default 16 prefetch threads thrash a 2-core machine, and
  # reading array_record is cheap next to tokenizing, which holds the GIL anyway.
  ds = ds.map(_Tokenize(tokenizer, cfg.text_key)).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(cfg.seq_len))
  # First fit over `bins` open rows: a chunk goes to the first row with room; when one
  # fits nowhere, the rows are emitted. One batch worth of bins keeps padding low while
  # the rows of a batch stay close to the order of the (shuffled) records.
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={'inputs': cfg.seq_len}, num_packing_bins=bins,
      shuffle_bins=False)
  return ds.map(_rename)


class EpochShuffle(grain.MapDataset):
  """Endless epochs of the parent, each in its own permutation drawn from (seed, epoch).

  grain's `shuffle().repeat()` does the same with a memory-free index shuffle, but that
  costs milliseconds per element on datasets of a few dozen records; a numpy
  permutation costs 4 bytes per record (120 MB for lm1b's 30M sentences) and nothing per
  element.
  """

  def __init__(self, parent: grain.MapDataset, *, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._permutation = functools.lru_cache(maxsize=2)(self._make_permutation)

  def _make_permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    return rng.permutation(len(self._parent)).astype(np.int64)

  def __len__(self) -> int:
    return sys.maxsize  # endless; the iterator's state holds the position

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, len(self._parent))
    return self._parent[int(self._permutation(epoch)[i])]

  def __str__(self) -> str:
    return f'EpochShuffle(seed={self._seed})'


def _rows_per_shard(cfg: DataConfig, shard_count: int) -> int:
  if shard_count < 1 or cfg.batch_size % shard_count:
    raise ValueError(f'batch_size={cfg.batch_size} is not divisible by the '
                     f'{shard_count} data shards (hosts)')
  return cfg.batch_size // shard_count


def host_rows(cfg: DataConfig, *, shard_index: int = 0, shard_count: int = 1,
              rows=None) -> np.ndarray:
  """The rows of each global batch that one host keeps, in the order it feeds them.

  `rows` names them (indices into the global batch of cfg.batch_size rows, as the batch
  sharding places them on this host's devices: training/loop.py `process_rows`); without
  it, host shard_index of shard_count keeps the shard_index-th of shard_count equal blocks.
  """
  if rows is None:
    count = _rows_per_shard(cfg, shard_count)
    if not 0 <= shard_index < shard_count:
      raise ValueError(f'shard_index={shard_index} is not one of the {shard_count} shards')
    return np.arange(shard_index * count, (shard_index + 1) * count)
  rows = np.asarray(rows, dtype=np.int64).reshape(-1)
  if not rows.size or rows.min() < 0 or rows.max() >= cfg.batch_size:
    raise ValueError(f'rows {rows.tolist()} are not a non-empty set of rows of a batch of '
                     f'{cfg.batch_size}')
  return rows


class KeepRows(grain.transforms.Map):
  """global batch -> this host's rows of it."""

  def __init__(self, rows: np.ndarray):
    self._rows = rows

  def map(self, batch: Batch) -> Batch:
    return {k: v[self._rows] for k, v in batch.items()}


def train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, shard_index: int = 0,
                   shard_count: int = 1, rows=None) -> grain.DatasetIterator:
  """Endless batches: this host's rows (see `host_rows`) of each global training batch.

  Every host reads all training records and packs the same global batches of
  cfg.batch_size rows: records shuffled with cfg.seed and reshuffled each epoch, packed
  into rows, the rows shuffled again in windows of SHUFFLE_WINDOW_ROWS. A host then keeps
  only its own rows. So the global batch at every step is the same however many hosts
  feed it (a 2-host run equals a 1-host run), and every host's iterator is at the same
  position: get_state()/set_state() capture it, and training checkpoints it with Orbax.

  The price: every host tokenizes and packs the whole global batch, where splitting the
  records between hosts would give each a 1/hosts share of that CPU work. We pay it
  because packing is sequential (first fit over the shuffled stream of documents): split
  records make other rows, so the batches, the losses and a checkpoint's data position
  would depend on the number of hosts. Should the pipeline ever bound the step time, the
  remedy is grain worker processes on each host, not more hosts.
  """
  keep = host_rows(cfg, shard_index=shard_index, shard_count=shard_count, rows=rows)
  source = data_source(cfg, 'train')
  if len(source) == 0:
    raise ValueError(f'the training split of {cfg.files or cfg.name!r} holds no records')
  ds = _packed_rows(EpochShuffle(grain.MapDataset.source(source), seed=cfg.seed),
                    tokenizer, cfg, bins=cfg.batch_size)
  if SHUFFLE_WINDOW_ROWS > 1:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=SHUFFLE_WINDOW_ROWS, seed=cfg.seed)
  ds = ds.batch(cfg.batch_size, drop_remainder=True)
  if not np.array_equal(keep, np.arange(cfg.batch_size)):
    ds = ds.map(KeepRows(keep))
  return iter(ds)


class EvalBatches:
  """One deterministic pass over a split, re-iterable; yields batches of a fixed shape.

  Every host packs the whole split into the same global batches of batch_size rows and
  keeps its own rows (see `host_rows`), so all hosts see the same number of batches (a
  multi-host eval step needs every host to call it equally often). The last batch is
  padded with all-zero rows.
  """

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, split: str, *,
               shard_index: int = 0, shard_count: int = 1, rows=None, max_batches: int = 0):
    self._cfg, self._tokenizer, self._split = cfg, tokenizer, split
    self._rows = host_rows(cfg, shard_index=shard_index, shard_count=shard_count, rows=rows)
    self._max_batches = max_batches
    self._source = data_source(cfg, split)

  def __iter__(self) -> Iterator[Batch]:
    cfg = self._cfg
    ds = _packed_rows(grain.MapDataset.source(self._source), self._tokenizer, cfg,
                      bins=cfg.batch_size)
    for count, batch in enumerate(ds.batch(cfg.batch_size, drop_remainder=False)):
      if self._max_batches and count >= self._max_batches:
        return
      yield {k: _pad_rows(batch[k], cfg.batch_size)[self._rows] for k in FEATURES}


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return np.pad(x, ((0, rows - x.shape[0]), (0, 0))) if x.shape[0] < rows else x


def eval_batches(cfg: DataConfig, tokenizer: Tokenizer, split: str, *, shard_index: int = 0,
                 shard_count: int = 1, rows=None, max_batches: int = 0) -> EvalBatches:
  """The batches of one pass over `split` ('validation' or 'test'); max_batches=0: all."""
  return EvalBatches(cfg, tokenizer, split, shard_index=shard_index, shard_count=shard_count,
                     rows=rows, max_batches=max_batches)
