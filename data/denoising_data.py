"""Encoder-decoder pretraining rows from plain text: the corrupted documents of T5's
objective comparison (Raffel et al. 2020, table 4) and of BART (Lewis et al. 2020).

  cfg = DataConfig(name='bible/en_es', text_key='en,es', task='span_corruption',
                   seq_len=64, extra_ids=100)
  task = denoising_task(cfg, tokenizer)
  it = seq2seq_data.train_iterator(cfg, tokenizer, task=task)   # packed pairs

The tasks (`cfg.task`), each (tokens, seed) -> (inputs, targets), EOS closing both:

  span_corruption  T5: noise spans -> sentinels (data/span_corruption.py); the raw length
                   is chosen so that the inputs fill their row exactly
  prefix_lm        T5: the text cut at a uniform point; inputs the prefix, targets the rest
  mlm_denoising    T5's "BERT-style": 15% of tokens 80% [MASK] / 10% random / 10% kept;
                   targets the whole original text
  bart_denoising   BART: [BOS] text -> data/bart_noising.py's recipe (`cfg.noising`);
                   targets the original text

Every feature named in `text_key` ('en,es': both sides of a parallel corpus, as two
monolingual documents) of every record is a document. Documents are tokenized and cut into
chunks of the task's raw length (a document's last chunk may be shorter); chunk k of
feature f of the record at place i of the epoch-shuffled stream is corrupted with seed
(cfg.seed, i, f, k). The place counts on across epochs, so each epoch draws fresh noise
(dynamic, as RoBERTa's masking) and a resumed iterator redraws exactly the same. The pairs
are then packed as data/seq2seq_data.py packs translation pairs (the same features).

Sentinels (span corruption) are the `cfg.extra_ids` ids above the tokenizer's vocabulary:
the model's vocabulary is the tokenizer's plus them.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from data import bart_noising
from data import pipeline
from data import seq2seq_data
from data import span_corruption

Pair = tuple[np.ndarray, np.ndarray]
# Pieces that end a sentence (BART's sentence permutation).
SENTENCE_ENDS = ('.', '!', '?')


def _with_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  return np.append(tokens, eos_id).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SpanCorruptionTask:
  """T5's span corruption; `vocab_size` is the model's (sentinels count down from it)."""
  inputs_length: int
  vocab_size: int
  eos_id: int
  recipe: span_corruption.SpanCorruption = span_corruption.SpanCorruption()

  @property
  def raw_length(self) -> int:
    return span_corruption.lengths_for(self.inputs_length, self.recipe)[0]

  @property
  def targets_length(self) -> int:
    return span_corruption.lengths_for(self.inputs_length, self.recipe)[1]

  def __call__(self, tokens: np.ndarray, seed) -> Pair:
    return span_corruption.span_corrupt(tokens, seed, vocab_size=self.vocab_size,
                                        eos_id=self.eos_id, recipe=self.recipe)


@dataclasses.dataclass(frozen=True)
class PrefixLMTask:
  """The text split at a uniformly drawn point 1..n-1: inputs the prefix, targets the rest."""
  inputs_length: int
  eos_id: int

  @property
  def raw_length(self) -> int:
    return self.inputs_length - 1

  @property
  def targets_length(self) -> int:
    return self.inputs_length

  def __call__(self, tokens: np.ndarray, seed) -> Pair:
    split = int(np.random.default_rng(seed).integers(1, len(tokens))) if len(tokens) > 1 else 1
    return _with_eos(tokens[:split], self.eos_id), _with_eos(tokens[split:], self.eos_id)


@dataclasses.dataclass(frozen=True)
class MlmDenoisingTask:
  """BERT's corruption of ⌈rate · n⌉ tokens (80% [MASK], 10% a random non-special token,
  10% kept), the whole original text as targets."""
  inputs_length: int
  rate: float
  eos_id: int
  mask_id: int
  first_plain_id: int  # random replacements are drawn from [first_plain_id, vocab_size)
  vocab_size: int

  @property
  def raw_length(self) -> int:
    return self.inputs_length - 1

  @property
  def targets_length(self) -> int:
    return self.inputs_length

  def __call__(self, tokens: np.ndarray, seed) -> Pair:
    rng = np.random.default_rng(seed)
    count = min(int(np.ceil(self.rate * len(tokens))), len(tokens))
    chosen = rng.choice(len(tokens), size=count, replace=False)
    kind = rng.random(count)  # < 0.8: [MASK]; < 0.9: random; else kept
    random_ids = rng.integers(self.first_plain_id, self.vocab_size, size=count)
    inputs = tokens.copy()
    inputs[chosen] = np.where(kind < 0.8, self.mask_id,
                              np.where(kind < 0.9, random_ids, tokens[chosen]))
    return _with_eos(inputs, self.eos_id), _with_eos(tokens, self.eos_id)


@dataclasses.dataclass(frozen=True)
class BartDenoisingTask:
  """BART: [BOS] text [EOS] noised by `recipe` as inputs (cut to the row, EOS kept),
  text [EOS] as targets (the decoder starts from BOS)."""
  inputs_length: int
  recipe: bart_noising.BartNoising
  bos_id: int
  eos_id: int
  mask_id: int
  sentence_end_ids: tuple[int, ...]

  @property
  def raw_length(self) -> int:
    return self.inputs_length - 2

  @property
  def targets_length(self) -> int:
    return self.inputs_length  # one more than text + [EOS] needs: rows of even shape

  def __call__(self, tokens: np.ndarray, seed) -> Pair:
    document = np.concatenate([[self.bos_id], tokens, [self.eos_id]]).astype(np.int32)
    noised = bart_noising.noise(document, seed, self.recipe, mask_id=self.mask_id,
                                sentence_end_ids=self.sentence_end_ids)
    if len(noised) > self.inputs_length:  # infilling's inserted masks can overflow the row
      noised = np.append(noised[:self.inputs_length - 1], self.eos_id)
    return noised.astype(np.int32), _with_eos(tokens, self.eos_id)


Corruption = SpanCorruptionTask | PrefixLMTask | MlmDenoisingTask | BartDenoisingTask


@functools.lru_cache(maxsize=4)
def sentence_end_ids(tokenizer) -> tuple[int, ...]:
  """The ids whose piece ends a sentence ('.', '!', '?' at its end)."""
  specials = set(getattr(tokenizer, 'special_ids', ()))
  return tuple(i for i in range(tokenizer.vocab_size) if i not in specials
               and tokenizer.decode([i]).rstrip().endswith(SENTENCE_ENDS))


def corruption(cfg: pipeline.DataConfig, tokenizer) -> Corruption:
  """The corruption `cfg.task` names, with its settings."""
  length = cfg.seq_len
  if cfg.task == 'span_corruption':
    if cfg.extra_ids < 1:
      raise ValueError("config.data.extra_ids must be >= 1 for task 'span_corruption' (its "
                       f'sentinels; T5 has 100), got {cfg.extra_ids}')
    recipe = span_corruption.SpanCorruption(cfg.noise_density, cfg.mean_span_length)
    spans = recipe.counts(span_corruption.lengths_for(length, recipe)[0])[1]
    if spans > cfg.extra_ids:
      raise ValueError(f'config.data.extra_ids={cfg.extra_ids}: rows of seq_len={length} '
                       f'hold up to {spans} noise spans, each needing its own sentinel')
    return SpanCorruptionTask(length, tokenizer.vocab_size + cfg.extra_ids, tokenizer.eos_id,
                              recipe)
  if cfg.task == 'prefix_lm':
    return PrefixLMTask(length, tokenizer.eos_id)
  if cfg.task == 'mlm_denoising':
    specials = getattr(tokenizer, 'special_ids', (0,))
    return MlmDenoisingTask(length, cfg.noise_density, tokenizer.eos_id, tokenizer.mask_id,
                            max(specials) + 1, tokenizer.vocab_size)
  if cfg.task == 'bart_denoising':
    return BartDenoisingTask(length, bart_noising.parse(cfg.noising), tokenizer.bos_id,
                             tokenizer.eos_id, tokenizer.mask_id, sentence_end_ids(tokenizer))
  raise ValueError(f'config.data.task={cfg.task!r} is not one of '
                   f'{", ".join(pipeline.DENOISING_TASKS)}')


class _Documents(grain.transforms.MapWithIndex):
  """(place i, record) -> (i, [tokens of each text feature])."""

  def __init__(self, tokenizer, keys: tuple[str, ...]):
    self._tokenizer, self._keys = tokenizer, keys

  def map_with_index(self, index: int, record):
    return index, [np.asarray(self._tokenizer.encode(pipeline._text(record, key)), np.int32)
                   for key in self._keys]


class _Corrupt(grain.experimental.FlatMapTransform):
  """(i, documents) -> one {'inputs', 'targets'} per chunk of each document."""

  def __init__(self, task: Corruption, seed: int):
    self._task, self._seed = task, seed
    self.max_fan_out = 1 << 20  # only consulted by the MapDataset flavour; documents vary

  def flat_map(self, element):
    index, documents = element
    raw = self._task.raw_length
    out = []
    for feature, tokens in enumerate(documents):
      for chunk, start in enumerate(range(0, len(tokens), raw)):
        inputs, targets = self._task(tokens[start:start + raw],
                                     (self._seed, index, feature, chunk))
        out.append({'inputs': inputs, 'targets': targets})
    return out


@dataclasses.dataclass(frozen=True)
class DenoisingTask:
  """The pair task (data/seq2seq_data.py `PairTask`) of encoder-decoder pretraining."""
  corruption: Corruption
  keys: tuple[str, ...]
  tokenizer: object
  targets_len: int
  seed: int

  def lengths(self) -> tuple[int, int]:
    return self.corruption.inputs_length, self.targets_len

  def pairs(self, records: grain.MapDataset) -> grain.IterDataset:
    ds = records.map_with_index(_Documents(self.tokenizer, self.keys))
    ds = ds.to_iter_dataset(seq2seq_data._READ)  # pylint: disable=protected-access
    return grain.experimental.FlatMapIterDataset(ds, _Corrupt(self.corruption, self.seed))


def denoising_task(cfg: pipeline.DataConfig, tokenizer) -> DenoisingTask:
  """The task of `cfg`; its target rows are `cfg.targets_len`, or (0) what the
  corruption needs (span corruption: ~0.27 of the inputs; others: as long as them)."""
  task = corruption(cfg, tokenizer)
  needed = task.targets_length
  if cfg.targets_len and cfg.targets_len < needed:
    raise ValueError(f'config.data.targets_len={cfg.targets_len} is shorter than the '
                     f'{needed} target tokens task {cfg.task!r} makes from seq_len='
                     f'{cfg.seq_len}; set it to 0 (derived) or >= {needed}')
  return DenoisingTask(task, pipeline.text_keys(cfg), tokenizer, cfg.targets_len or needed,
                       cfg.seed)
