"""The user's corpus: split discovery, held-out lines, parallel files, and clear errors."""

import re

import pytest

from data import text_files


def write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
  return path


def test_named_split_files(tmp_path):
  write(tmp_path / 'train_a.txt', 'one\ntwo\n')
  write(tmp_path / 'train_b.txt', 'three\n\n  four  \n')  # blank lines are skipped
  write(tmp_path / 'valid.txt', 'five\n')
  write(tmp_path / 'test.txt', 'six')  # no final newline
  records = text_files.split_records(text_files.discover(str(tmp_path)))
  assert records == {'train': [{'text': t} for t in ('one', 'two', 'three', 'four')],
                     'validation': [{'text': 'five'}], 'test': [{'text': 'six'}]}


def test_unnamed_files_hold_out_every_twentieth_line(tmp_path):
  write(tmp_path / 'corpus.txt', ''.join(f'line {i}\n' for i in range(60)))
  records = text_files.split_records(text_files.discover(str(tmp_path)))
  texts = {s: [r['text'] for r in rs] for s, rs in records.items()}
  assert texts['validation'] == ['line 18', 'line 38', 'line 58']
  assert texts['test'] == ['line 19', 'line 39', 'line 59']
  assert len(texts['train']) == 54 and 'line 17' in texts['train']


def test_tiny_corpus_still_gets_one_held_out_line_per_split(tmp_path):
  write(tmp_path / 'c.txt', 'a\nb\nc\nd\n')
  records = text_files.split_records(text_files.discover(str(tmp_path)))
  assert [len(records[s]) for s in text_files.SPLITS] == [2, 1, 1]


def test_parallel_files_by_suffix(tmp_path):
  write(tmp_path / 'train.en', 'hello\nworld\nskip me\n')
  write(tmp_path / 'train.es', 'hola\nmundo\n\n')  # an empty side drops the pair
  write(tmp_path / 'test.en', 'cat\n')
  write(tmp_path / 'test.es', 'gato\n')
  corpus = text_files.discover(f'{tmp_path}/train.en,{tmp_path}/train.es,'
                               f'{tmp_path}/test.en,{tmp_path}/test.es')
  assert corpus.features == ('en', 'es')
  records = text_files.split_records(corpus)
  assert records['train'] == [{'en': 'hello', 'es': 'hola'}]  # one more went to validation
  assert records['validation'] == [{'en': 'world', 'es': 'mundo'}]
  assert records['test'] == [{'en': 'cat', 'es': 'gato'}]


def test_digest_differs_between_corpora_and_after_an_edit(tmp_path):
  a = write(tmp_path / 'a' / 'train.txt', 'x\n')
  write(tmp_path / 'b' / 'train.txt', 'x\n')
  digest = text_files.discover(str(tmp_path / 'a')).digest
  assert digest != text_files.discover(str(tmp_path / 'b')).digest
  assert digest == text_files.discover(str(tmp_path / 'a')).digest
  a.write_text('x\ny\n')
  assert digest != text_files.discover(str(tmp_path / 'a')).digest


def _error(tmp_path, files):
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    text_files.split_records(text_files.discover(files))
  return str(info.value)


def test_error_empty_file(tmp_path):
  path = write(tmp_path / 'train.txt', '\n  \n')
  assert _error(tmp_path, str(tmp_path)) == f'{path}: the file is empty'


def test_error_non_utf8_names_file_and_line(tmp_path):
  path = write(tmp_path / 'train.txt', 'fine\nalso fine\ncaf\xe9 latin-1\n'.encode('latin-1'))
  message = _error(tmp_path, str(tmp_path))
  assert message.startswith(f'{path}: line 3 is not valid UTF-8'), message


def test_error_binary_file(tmp_path):
  path = write(tmp_path / 'train.txt', b'text\n\x89PNG\x00\x00\x01\n')
  message = _error(tmp_path, str(tmp_path))
  assert message.startswith(f'{path}: line 2 holds a NUL byte'), message
  assert 'binary' in message


def test_error_parallel_line_counts_name_both_files(tmp_path):
  en = write(tmp_path / 'train.en', 'a\nb\nc\n')
  es = write(tmp_path / 'train.es', 'x\ny\n')
  message = _error(tmp_path, str(tmp_path))
  assert f'{en} has 3 lines' in message and f'{es} has 2 lines' in message, message


def test_error_parallel_file_without_partner(tmp_path):
  write(tmp_path / 'train.en', 'a\n')
  write(tmp_path / 'train.es', 'x\n')
  stray = write(tmp_path / 'test.en', 'b\n')
  message = _error(tmp_path, str(tmp_path))
  assert str(stray) in message and '.es' in message, message


def test_error_missing_file(tmp_path):
  message = _error(tmp_path, f'{tmp_path}/nope.txt')
  assert re.search(r'nope\.txt: no such file', message), message


def test_builds_a_tfds_dataset_keyed_by_the_corpus(tmp_path):
  write(tmp_path / 'c1' / 'train.txt', 'alpha\nbeta\ngamma\n')
  write(tmp_path / 'c2' / 'train.txt', 'delta\nepsilon\nzeta\neta\n')
  data_dir = tmp_path / 'data'
  assert text_files.prepare(str(tmp_path / 'c1'), data_dir) == {
      'train': 1, 'validation': 1, 'test': 1}
  assert text_files.prepare(str(tmp_path / 'c2'), data_dir)['train'] == 2
  assert len(list((data_dir / 'text_files').iterdir())) == 2  # no collision
  source = text_files.data_source(str(tmp_path / 'c1'), data_dir, 'train')
  assert [source[i]['text'] for i in range(len(source))] == [b'alpha']
