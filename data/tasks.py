"""Encoder tasks: what BERT's and RoBERTa's examples look like, and fine-tuning tasks.

A task turns one split of a corpus into a random-access `ExampleSource`: `len(source)`
examples, each built by `source.example(index, epoch, seed)` as a dict of numpy arrays of
seq_len (the converter's model features). Everything random is drawn from
`np.random.default_rng((seed, epoch, index))`, so an example is a pure function of its key
and a resumed iterator yields the same ones. data/encoder_data.py batches them with grain.

Features of every example ([seq_len] int32 unless noted):
  inputs       token ids: `[CLS] a [SEP] (b [SEP])`, or `<s> s1 s2 ... </s>`; pad_id after
  token_types  0 for `[CLS] a [SEP]`, 1 for `b [SEP]`
  segment_ids  1 on real tokens, 0 on padding (one example per row)
  positions    0..n-1 on real tokens, 0 on padding
  word_starts  1 where a token starts a word (for whole-word masking), 0 otherwise
  nsp_label    [] int32 (nsp): 0 = B follows A, 1 = B is from another book
  label        [] int32, float32 for regression (fine-tuning tasks)

Tasks by name (`TASKS`): 'nsp' (BERT sentence pairs), 'full_sentences' (RoBERTa rows),
'paraphrase', 'translation', 'genre' (from bible/kjv_web), 'glue/sst2', 'glue/mrpc',
'glue/stsb' (TFDS, when prepared locally). Pretraining sentences are verses, documents
are chapters (bible/kjv_web, split by book like every bible dataset).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data import bible
from data import pipeline

Example = dict[str, np.ndarray]
# The sentencepiece tokenizer's (pad, unk, bos, eos, [MASK], [SEP], [CLS]).
_SENTENCEPIECE_SPECIALS = tuple(range(7))

# A book's genre, by the usual division of the protestant canon. Acts is the NT's history
# and Revelation sits with the prophets (apocalyptic); Lamentations with the prophets too.
GENRES = ('law', 'history', 'poetry', 'prophecy', 'gospel', 'letter')
_GENRE_BOOKS = {
    'law': 'Gen Exod Lev Num Deut',
    'history': 'Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Acts',
    'poetry': 'Job Ps Prov Eccl Song',
    'prophecy': 'Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech '
                'Mal Rev',
    'gospel': 'Matt Mark Luke John',
    'letter': 'Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas '
              '1Pet 2Pet 1John 2John 3John Jude',
}
GENRE_OF = {book: GENRES.index(g) for g, books in _GENRE_BOOKS.items() for book in books.split()}


# ---------------------------------------------------------------------------------------
# Tokenizer helpers: both tokenizers (data/tokenizer.py, data/subword.py) provide these.

def special_ids(tokenizer) -> np.ndarray:
  return np.asarray(getattr(tokenizer, 'special_ids', _SENTENCEPIECE_SPECIALS), np.int32)


def word_starts(tokenizer, ids: Sequence[int]) -> np.ndarray:
  """[len(ids)] bool: where a word starts; a text's first token always does."""
  ids = np.asarray(ids, np.int32)
  if hasattr(tokenizer, 'word_starts'):
    starts = np.asarray(tokenizer.word_starts(ids), bool)
  elif hasattr(tokenizer, 'id_to_piece'):  # sentencepiece: '▁' opens a word
    starts = _piece_starts(tokenizer)[ids]
  else:
    starts = np.ones(len(ids), bool)
  if len(starts):
    starts[0] = True  # byte-level BPE marks no start on a text's first word
  return starts


@functools.lru_cache(maxsize=4)
def _piece_starts(tokenizer) -> np.ndarray:
  return np.asarray([tokenizer.id_to_piece(i).startswith('\u2581')
                     for i in range(tokenizer.vocab_size)], bool)


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
  if hasattr(tokenizer, 'encode_batch'):
    return tokenizer.encode_batch(texts)
  return [tokenizer.encode(t) for t in texts]


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------
# The converter: one or two token sequences -> padded model features.

def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths after removing tokens one by one from the end of the longer side (of b on a
  tie, as Hugging Face's 'longest_first') until len_a + len_b <= budget."""
  excess = len_a + len_b - budget
  if excess <= 0:
    return len_a, len_b
  first = min(excess, abs(len_a - len_b))  # from the longer side until both are equal
  if len_a > len_b:
    len_a -= first
  else:
    len_b -= first
  rest = excess - first  # then alternately, b first
  return len_a - rest // 2, len_b - (rest + 1) // 2


def pair_features(tokenizer, a: Sequence[int], b: Sequence[int] | None, seq_len: int, *,
                  a_starts=None, b_starts=None) -> Example:
  """`[CLS] a [SEP] (b [SEP])`, longest-first truncated to seq_len and padded (see top)."""
  specials = 3 if b is not None else 2
  if seq_len < specials + (2 if b is not None else 1):
    raise ValueError(f'seq_len={seq_len} has no room for the texts and {specials} specials')
  b = [] if b is None else b
  la, lb = truncate_longest_first(len(a), len(b), seq_len - specials)
  a_starts = word_starts(tokenizer, a) if a_starts is None else a_starts
  b_starts = word_starts(tokenizer, b) if b_starts is None else b_starts
  cls, sep = [tokenizer.cls_id], [tokenizer.sep_id]
  parts = [cls, a[:la], sep] + ([b[:lb], sep] if specials == 3 else [])
  starts = [[1], a_starts[:la], [1]] + ([b_starts[:lb], [1]] if specials == 3 else [])
  ids = np.concatenate([np.asarray(p, np.int32) for p in parts])
  n, n_first = len(ids), la + 2
  features = _padded(tokenizer, ids, np.concatenate([np.asarray(s, np.int32) for s in starts]),
                     seq_len)
  features['token_types'][n_first:n] = 1
  return features


def _padded(tokenizer, ids: np.ndarray, starts: np.ndarray, seq_len: int) -> Example:
  """One segment of real tokens followed by padding: the features every task shares."""
  n = len(ids)
  inputs = np.full(seq_len, tokenizer.pad_id, np.int32)
  inputs[:n] = ids
  positions = np.zeros(seq_len, np.int32)
  positions[:n] = np.arange(n)
  starts_T = np.zeros(seq_len, np.int32)
  starts_T[:n] = starts
  return {'inputs': inputs, 'token_types': np.zeros(seq_len, np.int32),
          'segment_ids': (np.arange(seq_len) < n).astype(np.int32), 'positions': positions,
          'word_starts': starts_T}


# ---------------------------------------------------------------------------------------
# Sentence source: verses in order, grouped per (book, chapter, translation) = a document.

@functools.lru_cache(maxsize=8)
def _verse_records(data_dir: str, split: str) -> tuple[tuple, ...]:
  """bible/kjv_web's split as (book index, chapter, verse, kjv, web), canonical order."""
  source = tfds.data_source('bible/kjv_web', split=split, data_dir=data_dir, download=False)
  rows = [(bible.BOOKS.index(_text(r['book'])), int(r['chapter']), int(r['verse']),
           _text(r['kjv']), _text(r['web'])) for r in source.__getitems__(range(len(source)))]
  return tuple(sorted(rows))


def verses(data_dir: str | os.PathLike, split: str) -> tuple[tuple, ...]:
  """(book index, chapter, verse, kjv, web) of a split (`from data import bible` above
  registers the dataset with TFDS)."""
  return _verse_records(os.fspath(data_dir), split)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Tokenized documents: sentence s is tokens[offsets[s]:offsets[s + 1]].

  Documents are contiguous runs of sentences (doc_starts[d]:doc_starts[d + 1]) ordered by
  book, so the documents of one book are a contiguous run too (book_docs[b]).
  """
  tokens: np.ndarray       # [tokens] int32
  starts: np.ndarray       # [tokens] bool, word starts
  offsets: np.ndarray      # [sentences + 1]
  doc_of: np.ndarray       # [sentences] document of each sentence
  doc_starts: np.ndarray   # [documents + 1] first sentence of each document
  doc_book: np.ndarray     # [documents] book index

  def sentence(self, s: int) -> slice:
    return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

  def span(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and word starts of sentences first..stop-1."""
    where = slice(int(self.offsets[first]), int(self.offsets[stop]))
    return self.tokens[where], self.starts[where]


def build_corpus(tokenizer, documents: Sequence[tuple[int, Sequence[str]]]) -> Corpus:
  """Corpus of (book index, sentences) documents, in the order given."""
  # A space before every sentence but a document's first, as running text has it: byte-level
  # BPE then codes a sentence's first word as it does mid-text ('ĠAnd'); the others ignore it.
  texts = [(' ' if k else '') + t for _, sentences in documents
           for k, t in enumerate(sentences)]
  ids = _encode_all(tokenizer, texts)
  lengths = np.asarray([len(i) for i in ids], np.int64)
  sizes = np.asarray([len(s) for _, s in documents], np.int64)
  tokens = np.asarray([t for i in ids for t in i], np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  # One call for the whole corpus; then every sentence's first token starts a word.
  starts = word_starts(tokenizer, tokens)
  starts[offsets[:-1][lengths > 0]] = True
  return Corpus(
      tokens=tokens,
      starts=starts,
      offsets=offsets,
      doc_of=np.repeat(np.arange(len(documents)), sizes),
      doc_starts=np.concatenate([[0], np.cumsum(sizes)]),
      doc_book=np.asarray([b for b, _ in documents], np.int64))


def bible_documents(data_dir, split: str, translations: Sequence[str]
                    ) -> list[tuple[int, list[str]]]:
  """One document per (book, chapter, translation): its verses in order."""
  column = {'kjv': 3, 'web': 4}
  docs: dict[tuple, list[str]] = {}
  for record in verses(data_dir, split):
    for t in translations:
      docs.setdefault((record[0], record[1], t), []).append(record[column[t]])
  return [(key[0], texts) for key, texts in docs.items()]


# ---------------------------------------------------------------------------------------
# BERT's sentence pairs and RoBERTa's FULL-SENTENCES rows.

class NspSource:
  """One example per sentence that has a successor in its document: A starts there."""

  def __init__(self, corpus: Corpus, tokenizer, seq_len: int, short_seq_prob: float):
    self.corpus, self.tokenizer, self.seq_len = corpus, tokenizer, seq_len
    self.short_seq_prob = short_seq_prob
    doc_of = corpus.doc_of
    self.firsts = np.flatnonzero(doc_of[:-1] == doc_of[1:])
    if len(np.unique(corpus.doc_book)) < 2:
      raise ValueError('NSP needs documents of at least two books (random B comes from '
                       'another book)')
    books = corpus.doc_book
    self.book_lo = np.searchsorted(books, books, side='left')   # per document
    self.book_hi = np.searchsorted(books, books, side='right')
    if np.any(np.diff(books) < 0):
      raise ValueError('documents must be ordered by book')

  def __len__(self) -> int:
    return len(self.firsts)

  def example(self, index: int, epoch: int, seed: int) -> Example:
    c, rng = self.corpus, np.random.default_rng((seed, epoch, index))
    budget = self.seq_len - 3
    # BERT's short_seq_prob: sometimes aim short, so fine-tuning's short inputs are seen.
    target = budget if rng.random() >= self.short_seq_prob else int(rng.integers(2, budget + 1))
    first = int(self.firsts[index])
    doc = int(c.doc_of[first])
    doc_end = int(c.doc_starts[doc + 1])
    stop, total = first + 2, int(c.offsets[first + 2] - c.offsets[first])
    while stop < doc_end and total < target:  # a chunk of >= 2 sentences, about target long
      total += int(c.offsets[stop + 1] - c.offsets[stop])
      stop += 1
    a_stop = first + int(rng.integers(1, stop - first))  # A: 1 .. all but one sentence
    is_random = rng.random() < 0.5
    a, a_starts = c.span(first, a_stop)
    if not is_random:
      b, b_starts = c.span(a_stop, stop)
    else:  # a document of another book: skip this book's contiguous run of documents
      lo, hi = int(self.book_lo[doc]), int(self.book_hi[doc])
      other = int(rng.integers(len(c.doc_book) - (hi - lo)))
      other += (hi - lo) if other >= lo else 0
      s = int(rng.integers(c.doc_starts[other], c.doc_starts[other + 1]))
      b_stop, b_len = s + 1, int(c.offsets[s + 1] - c.offsets[s])
      while b_stop < c.doc_starts[other + 1] and b_len < target - len(a):
        b_len += int(c.offsets[b_stop + 1] - c.offsets[b_stop])
        b_stop += 1
      b, b_starts = c.span(s, b_stop)
    features = pair_features(self.tokenizer, a, b, self.seq_len, a_starts=a_starts,
                             b_starts=b_starts)
    features['nsp_label'] = np.asarray(int(is_random), np.int32)
    return features


class FullSentencesSource:
  """RoBERTa's FULL-SENTENCES: `<s> s1 s2 ... </s>` of whole sentences, read contiguously
  across documents with an extra `</s>` between two documents; padding only at the end.

  Rows are packed once from the documents in order; epochs reshuffle the rows. A sentence
  longer than a row is cut into pieces of a row's length, so no token is lost.
  """

  def __init__(self, corpus: Corpus, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len
    room = seq_len - 2  # for <s> and </s>
    separator = (np.asarray([tokenizer.eos_id], np.int32), np.ones(1, bool))
    rows, row, used = [], [], 0
    for s in range(len(corpus.offsets) - 1):
      ids, starts = corpus.tokens[corpus.sentence(s)], corpus.starts[corpus.sentence(s)]
      new_doc = s > 0 and corpus.doc_of[s] != corpus.doc_of[s - 1]
      for lo in range(0, len(ids), room):  # an over-long sentence in pieces of a row
        piece = (ids[lo:lo + room], starts[lo:lo + room])
        sep = int(new_doc and lo == 0 and used > 0)
        if used + sep + len(piece[0]) > room:  # a row never ends or starts with a separator
          rows.append(row)
          row, used, sep = [], 0, 0
        row += [separator, piece] if sep else [piece]
        used += sep + len(piece[0])
    rows += [row] if row else []
    pieces = [p for r in rows for p in r]
    self.stream = np.concatenate([p[0] for p in pieces] or [np.zeros(0, np.int32)])
    self.stream_starts = np.concatenate([p[1] for p in pieces] or [np.zeros(0, bool)])
    self.bounds = np.cumsum([0] + [sum(len(p[0]) for p in r) for r in rows])

  def __len__(self) -> int:
    return len(self.bounds) - 1

  def example(self, index: int, epoch: int, seed: int) -> Example:
    del epoch, seed  # rows are fixed; only their order changes
    lo, hi = int(self.bounds[index]), int(self.bounds[index + 1])
    t = self.tokenizer
    ids = np.concatenate([[t.bos_id], self.stream[lo:hi], [t.eos_id]]).astype(np.int32)
    return _padded(t, ids, np.concatenate([[1], self.stream_starts[lo:hi], [1]]),
                   self.seq_len)


# ---------------------------------------------------------------------------------------
# Fine-tuning tasks: examples {'sentence' | 'sentence1', 'sentence2', 'label'} of a split.

def paraphrase_examples(data_dir, split: str, seed: int) -> list[dict]:
  """MRPC-style: a KJV verse and a WEB verse, the same verse (1) or, half of the time,
  another verse of the same chapter (0), so topic and names do not give the answer."""
  records = verses(data_dir, split)
  chapter_keys = np.asarray([r[0] * 1000 + r[1] for r in records])  # sorted
  lo = np.searchsorted(chapter_keys, chapter_keys, side='left')
  hi = np.searchsorted(chapter_keys, chapter_keys, side='right')
  # One generator per split (not per example): 27k generators would cost a second.
  rng = np.random.default_rng((seed, 1))
  negative = (rng.random(len(records)) < 0.5) & (hi - lo > 1)
  other = lo + (rng.random(len(records)) * np.maximum(hi - lo - 1, 1)).astype(np.int64)
  other += other >= np.arange(len(records))  # skip the verse itself
  other = np.where(negative, other, np.arange(len(records)))
  return [{'sentence1': r[3], 'sentence2': records[o][4], 'label': int(not neg)}
          for r, o, neg in zip(records, other, negative)]


def translation_examples(data_dir, split: str, seed: int) -> list[dict]:
  """One verse per verse of the split, KJV (0) or WEB (1) drawn at random."""
  records = verses(data_dir, split)
  labels = np.random.default_rng((seed, 2)).random(len(records)) < 0.5
  return [{'sentence': r[4] if label else r[3], 'label': int(label)}
          for r, label in zip(records, labels)]


def genre_examples(data_dir, split: str, seed: int) -> list[dict]:
  """A WEB verse and the genre of its book (GENRES). The splits hold out whole books, so
  the model must tell genre from style and content, not from names it memorised."""
  del seed
  return [{'sentence': r[4], 'label': GENRE_OF[bible.BOOKS[r[0]]]}
          for r in verses(data_dir, split)]


# GLUE's text features per task (TFDS names); test labels are -1 (hidden).
GLUE = {  # name: (text features, classes; 0 = regression)
    'glue/cola': (('sentence',), 2), 'glue/sst2': (('sentence',), 2),
    'glue/mrpc': (('sentence1', 'sentence2'), 2), 'glue/qqp': (('question1', 'question2'), 2),
    'glue/stsb': (('sentence1', 'sentence2'), 0), 'glue/mnli': (('premise', 'hypothesis'), 3),
    'glue/qnli': (('question', 'sentence'), 2), 'glue/rte': (('sentence1', 'sentence2'), 2),
    'glue/wnli': (('sentence1', 'sentence2'), 2),
}


def glue_examples(name: str, data_dir, split: str) -> list[dict]:
  """A prepared TFDS GLUE split (array_record) as a list of examples."""
  # Without TensorFlow, tfds registers no catalog builder until its module is imported.
  import tensorflow_datasets.text.glue  # pylint: disable=g-import-not-at-top,unused-import
  source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
  keys = GLUE[name][0]
  result = []
  for i in range(len(source)):  # one by one: tfds' mock data source has no __getitems__
    r = source[i]
    result.append({**{k: _text(r[k]) for k in keys}, 'label': r['label'].item()})
  return result


class TextSource:
  """Fine-tuning examples, tokenized when read: the converter's features plus `label`."""

  def __init__(self, examples: list[dict], text_keys: tuple[str, ...], tokenizer,
               seq_len: int, regression: bool):
    self.examples, self.text_keys, self.tokenizer = examples, text_keys, tokenizer
    self.seq_len, self.dtype = seq_len, np.float32 if regression else np.int32

  def __len__(self) -> int:
    return len(self.examples)

  def example(self, index: int, epoch: int, seed: int) -> Example:
    del epoch, seed  # fixed examples
    ex = self.examples[index]
    texts = [self.tokenizer.encode(ex[k]) for k in self.text_keys]
    features = pair_features(self.tokenizer, texts[0], texts[1] if len(texts) > 1 else None,
                             self.seq_len)
    features['label'] = np.asarray(ex['label'], self.dtype)
    return features


# ---------------------------------------------------------------------------------------
# Tasks by name.

@functools.lru_cache(maxsize=8)
def _corpus(data_dir: str, split: str, translations: tuple[str, ...], tokenizer) -> Corpus:
  return build_corpus(tokenizer, bible_documents(data_dir, split, translations))


@dataclasses.dataclass(frozen=True)
class PretrainingTask:
  """Sentences of bible/kjv_web (one translation's documents, or each translation's)
  laid out as 'nsp' pairs or 'full_sentences' rows.

  mask_fn: static masking (BERT's): `mask_fn(inputs, maskable, word_starts, seed) ->
  (inputs, mlm_targets, mlm_weights)` fixes each example's mask in the pipeline; with
  dupe_factor copies, epoch e reuses copy e % dupe_factor (example and mask), as BERT's
  create_pretraining_data does. None: masking is dynamic, on device.
  """
  name: str
  layout: str = 'nsp'
  translations: tuple[str, ...] = ('web',)
  short_seq_prob: float = 0.1
  mask_fn: Callable | None = None
  dupe_factor: int = 1

  def source(self, cfg: pipeline.DataConfig, tokenizer, split: str):
    corpus = _corpus(os.fspath(pipeline.data_dir(cfg)), split, self.translations, tokenizer)
    if self.layout == 'nsp':
      return NspSource(corpus, tokenizer, cfg.seq_len, self.short_seq_prob)
    if self.layout == 'full_sentences':
      return FullSentencesSource(corpus, tokenizer, cfg.seq_len)
    raise ValueError(f'layout {self.layout!r} is not one of nsp, full_sentences')


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """One or two texts and a label (num_classes = 0: a float regression target)."""
  name: str
  text_keys: tuple[str, ...]
  num_classes: int
  examples: Callable[..., list[dict]]  # (data_dir, split, seed) -> examples
  seed: int = 0  # the examples' seed: fixed, so a split is the same in every run
  mask_fn = None
  dupe_factor = 1

  def source(self, cfg: pipeline.DataConfig, tokenizer, split: str) -> TextSource:
    return TextSource(self.split_examples(pipeline.data_dir(cfg), split), self.text_keys,
                      tokenizer, cfg.seq_len, regression=not self.num_classes)

  def split_examples(self, data_dir, split: str) -> list[dict]:
    return _examples(self, os.fspath(data_dir), split)


@functools.lru_cache(maxsize=16)
def _examples(task: ClassificationTask, data_dir: str, split: str) -> list[dict]:
  return task.examples(data_dir, split, task.seed)


def _glue_task(name: str) -> ClassificationTask:
  keys, classes = GLUE[name]
  return ClassificationTask(name, keys, classes,
                            lambda data_dir, split, seed: glue_examples(name, data_dir, split))


TASKS = {
    'nsp': PretrainingTask('nsp', 'nsp'),
    'full_sentences': PretrainingTask('full_sentences', 'full_sentences'),
    'paraphrase': ClassificationTask('paraphrase', ('sentence1', 'sentence2'), 2,
                                     paraphrase_examples),
    'translation': ClassificationTask('translation', ('sentence',), 2, translation_examples),
    'genre': ClassificationTask('genre', ('sentence',), len(GENRES), genre_examples),
    **{name: _glue_task(name) for name in GLUE},
}


def get_task(task) -> PretrainingTask | ClassificationTask:
  """A task by name (TASKS), or the task itself."""
  if isinstance(task, str):
    if task not in TASKS:
      raise ValueError(f'unknown task {task!r}; one of {sorted(TASKS)}')
    return TASKS[task]
  return task


def baseline(task, split: str, *, data_dir=None) -> dict[str, float]:
  """The trivial baseline on `split`: the training split's majority class (its accuracy
  and F1: of class 1 for two classes, macro otherwise), or for regression its mean (MSE)."""
  task = get_task(task)
  data_dir = data_dir or pipeline.data_dir(pipeline.DataConfig())
  train = np.asarray([e['label'] for e in task.split_examples(data_dir, 'train')])
  labels = np.asarray([e['label'] for e in task.split_examples(data_dir, split)])
  if not task.num_classes:
    mean = float(train.mean())
    return {'mean': mean, 'mse': float(np.mean((labels - mean) ** 2))}
  majority = int(np.bincount(train, minlength=task.num_classes).argmax())
  # F1 of a constant prediction: only the majority class has hits (precision = its
  # share, recall = 1); macro F1 averages over the classes present (as sklearn does).
  share = float(np.mean(labels == majority))
  f1_majority = 2 * share / (1 + share) if share else 0.0
  if task.num_classes == 2:
    f1 = f1_majority if majority == 1 else 0.0
  else:
    f1 = f1_majority / len(set(labels.tolist()) | {majority})
  return {'majority': majority, 'accuracy': share, 'f1': f1}
