"""The `bible` TFDS dataset: split by book without leaks, pairs aligned verse by verse."""

import collections

import pytest
import tensorflow_datasets as tfds

from data import bible
from data import sword


def test_split_lists_are_fixed_disjoint_books_from_both_testaments():
  assert len(bible.BOOKS) == 66 and bible.BOOKS[0] == 'Gen' and bible.BOOKS[-1] == 'Rev'
  held_out = set(bible.VALIDATION_BOOKS) | set(bible.TEST_BOOKS)
  assert not set(bible.VALIDATION_BOOKS) & set(bible.TEST_BOOKS)
  assert held_out <= set(bible.BOOKS)
  nt = set(bible.BOOKS[39:])
  for books in (bible.VALIDATION_BOOKS, bible.TEST_BOOKS):
    assert len(books) == 5
    assert 1 <= len(set(books) & nt) < len(books)  # both testaments
  assert [bible.split_of(b) for b in ('Gen', 'Mark', 'John')] == ['train', 'validation', 'test']


def _verses(*refs_and_texts):
  return [sword.Verse(b, c, v, t) for b, c, v, t in refs_and_texts]


def test_align_joins_on_reference_and_drops_unmatched():
  a = _verses(('Gen', 1, 1, 'a1'), ('Gen', 1, 2, 'a2'), ('Mal', 4, 1, 'a3'))
  b = _verses(('Gen', 1, 2, 'b2'), ('Gen', 1, 1, 'b1'), ('Mal', 3, 19, 'b3'))
  pairs = [(x.text, y.text) for x, y in bible.align(a, b)]
  assert pairs == [('a1', 'b1'), ('a2', 'b2')]


def test_chapters_join_verses_with_a_space():
  verses = _verses(('Gen', 1, 1, 'One.'), ('Gen', 1, 2, 'Two.'), ('Gen', 2, 1, 'Three.'))
  assert bible.chapters(verses) == {('Gen', 1): 'One. Two.', ('Gen', 2): 'Three.'}


# ---------------------------------------------------------------------------------------
# The prepared datasets.

def _records(data_dir, config, split):
  source = tfds.data_source(f'bible/{config}', split=split, data_dir=str(data_dir),
                            download=False)
  return source.__getitems__(list(range(len(source))))  # one read, not one per record


@pytest.fixture(scope='module')
def datasets(real_data_dir):
  return {c: {s: _records(real_data_dir, c, s) for s in bible.SPLITS}
          for c in ('en', 'en_es', 'kjv_web')}


def test_no_book_in_two_splits(datasets):
  for config, splits in datasets.items():
    books = {s: {r['book'].decode() for r in records} for s, records in splits.items()}
    assert books['validation'] == set(bible.VALIDATION_BOOKS), config
    assert books['test'] == set(bible.TEST_BOOKS), config
    assert not books['train'] & (books['validation'] | books['test']), config
    assert len(books['train']) == 56, config


def test_en_has_every_chapter_of_both_translations_once(datasets):
  count = collections.Counter()
  for records in datasets['en'].values():
    for r in records:
      count[(r['translation'].decode(), r['book'].decode(), int(r['chapter']))] += 1
  assert set(count.values()) == {1}
  assert sum(1 for t, _, _ in count if t == 'kjv') == 1189  # chapters of the 66 books
  assert sum(1 for t, _, _ in count if t == 'web') == 1189
  john11 = next(r['text'].decode() for r in datasets['en']['test']
                if r['translation'] == b'kjv' and r['book'] == b'John' and r['chapter'] == 11)
  assert ' Jesus wept. ' in john11 and john11.startswith('Now a certain man was sick')


def test_pairs_are_the_same_verse(real_verses, datasets):
  text = real_verses
  for config, (left, right) in {'en_es': (('en', 'web'), ('es', 'rv1909')),
                                'kjv_web': (('kjv', 'kjv'), ('web', 'web'))}.items():
    refs = set()
    for records in datasets[config].values():
      for r in records:
        ref = (r['book'].decode(), int(r['chapter']), int(r['verse']))
        refs.add(ref)
        assert r[left[0]].decode() == text[left[1]][ref], (config, ref)
        assert r[right[0]].decode() == text[right[1]][ref], (config, ref)
    both = {ref for ref in text[left[1]] if ref[0] in bible.BOOKS} & set(text[right[1]])
    assert refs == both, config  # every shared verse, once (refs is a set of all records)
    assert sum(len(r) for r in datasets[config].values()) == len(both)
