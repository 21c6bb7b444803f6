"""The offline Bible corpus as a TFDS dataset `bible` (array_record, no TensorFlow needed).

Configs:
  bible/en       one example per chapter per English translation (KJV and WEB, the 66
                 books of the protestant canon): text, translation, book, chapter.
  bible/en_es    verse-aligned WEB (English) - Reina-Valera 1909 (Spanish) pairs.
  bible/kjv_web  verse-aligned KJV - WEB pairs (the same verse in two English styles).

Splits are by book, so no book's text appears in two splits (verses of one book share
names, phrasing and topics; splitting by verse would leak them into the test set).

  import data.bible  # registers the builder
  source = tfds.data_source('bible/en', split='train', data_dir=...)
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from data import sword

# The 66 books in canonical order (KJV versification: 39 OT then 27 NT).
BOOKS: tuple[str, ...] = tuple(
    book for t in sword.TESTAMENTS for book, _ in sword.versification_table()['kjv'][t])

# Five books each (7.6% of the books, 6-7% of the verses), three from the OT and two from
# the NT, mixing history, poetry, prophecy, gospel and letter so that every genre is seen
# in training and each held-out split still covers most of them.
VALIDATION_BOOKS: tuple[str, ...] = ('Judg', 'Ezra', 'Hos', 'Mark', 'Phil')
TEST_BOOKS: tuple[str, ...] = ('1Kgs', 'Lam', 'Mic', 'John', 'Jas')
SPLITS = ('train', 'validation', 'test')

_HOMEPAGE = 'https://www.crosswire.org/sword/'
_CITATION = 'Public-domain Bibles packaged by Debian as SWORD modules (sword-text-*).'


def split_of(book: str) -> str:
  """The split a book belongs to: 'validation', 'test' or 'train'."""
  if book in VALIDATION_BOOKS:
    return 'validation'
  if book in TEST_BOOKS:
    return 'test'
  return 'train'


def chapters(verses: list[sword.Verse]) -> dict[tuple[str, int], str]:
  """{(book, chapter): the chapter's verses joined with a space}, canonical order kept."""
  grouped: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
  for v in verses:
    grouped[(v.book, v.chapter)].append(v.text)
  return {key: ' '.join(texts) for key, texts in grouped.items()}


def align(a: list[sword.Verse], b: list[sword.Verse]) -> list[tuple[sword.Verse, sword.Verse]]:
  """Pairs of verses with the same (book, chapter, verse); verses missing in one side go."""
  by_ref = {(v.book, v.chapter, v.verse): v for v in b}
  return [(v, by_ref[(v.book, v.chapter, v.verse)]) for v in a
          if (v.book, v.chapter, v.verse) in by_ref]


@dataclasses.dataclass(frozen=True)
class _Pairing:
  """A verse-aligned config: which translation fills which feature."""
  left: tuple[str, str]   # (feature name, translation)
  right: tuple[str, str]


_PAIRINGS = {
    'en_es': _Pairing(left=('en', 'web'), right=('es', 'rv1909')),
    'kjv_web': _Pairing(left=('kjv', 'kjv'), right=('web', 'web')),
}


class Bible(tfds.core.GeneratorBasedBuilder):
  """Public-domain Bibles (KJV, WEB, Reina-Valera 1909) read from Debian's SWORD modules."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: en, en_es, kjv_web, split by book.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='en', description='KJV and WEB, one example per chapter.'),
      tfds.core.BuilderConfig(name='en_es', description='WEB - Reina-Valera 1909 verses.'),
      tfds.core.BuilderConfig(name='kjv_web', description='KJV - WEB verse pairs.'),
  ]
  DEFAULT_CONFIG_NAME = 'en'

  def __init__(self, *, file_format=None, **kwargs):
    # array_record is the format that TFDS reads without TensorFlow (random access).
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text, scalar = tfds.features.Text(), tfds.features.Scalar(dtype=np.int32)
    if self.builder_config.name == 'en':
      features = {'text': text, 'translation': text, 'book': text, 'chapter': scalar}
    else:
      pairing = _PAIRINGS[self.builder_config.name]
      features = {pairing.left[0]: text, pairing.right[0]: text, 'book': text,
                  'chapter': scalar, 'verse': scalar}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features), homepage=_HOMEPAGE,
        citation=_CITATION)

  def _sword_root(self) -> pathlib.Path:
    # `_data_dir_root` is the data_dir the builder was made with (`data_dir` itself points
    # into the versioned, temporary directory while preparing).
    return sword.fetch(self._data_dir_root)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download over the network
    root = self._sword_root()
    name = self.builder_config.name
    if name == 'en':
      examples = list(_chapter_examples(root))
    else:
      examples = list(_pair_examples(root, _PAIRINGS[name]))
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for key, example in examples:
      by_split[split_of(example['book'])].append((key, example))
    return {s: iter(by_split[s]) for s in SPLITS}

  def _generate_examples(self, **kwargs):  # required by the base class; unused
    raise NotImplementedError


def _chapter_examples(root: os.PathLike) -> Iterator[tuple[str, dict]]:
  """(key, example) per chapter of KJV and WEB, restricted to the 66 books."""
  canon = set(BOOKS)
  for translation in ('kjv', 'web'):
    verses = [v for v in sword.read_translation(root, translation) if v.book in canon]
    for (book, chapter), text in chapters(verses).items():
      yield (f'{translation}.{book}.{chapter}',
             {'text': text, 'translation': translation, 'book': book, 'chapter': chapter})


def _pair_examples(root: os.PathLike, pairing: _Pairing) -> Iterator[tuple[str, dict]]:
  """(key, example) per verse present in both translations of `pairing`."""
  (left_key, left), (right_key, right) = pairing.left, pairing.right
  canon = set(BOOKS)
  left_verses = [v for v in sword.read_translation(root, left) if v.book in canon]
  for a, b in align(left_verses, list(sword.read_translation(root, right))):
    yield (f'{a.book}.{a.chapter}.{a.verse}',
           {left_key: a.text, right_key: b.text, 'book': a.book, 'chapter': a.chapter,
            'verse': a.verse})


def prepare(data_dir: str | os.PathLike, config: str) -> dict[str, int]:
  """Builds `bible/<config>` under data_dir if missing; returns {split: examples}."""
  builder = Bible(config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  return {name: info.num_examples for name, info in builder.info.splits.items()}
