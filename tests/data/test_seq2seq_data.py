"""Sequence pairs: per-side packing, shifted decoder inputs, the joint vocabulary, files."""

import numpy as np
import pytest

from data import pipeline
from data import seq2seq_data


def test_shift_right_starts_every_segment_with_bos():
  targets = np.array([[5, 6, 3, 7, 3, 0]])
  positions = np.array([[0, 1, 2, 0, 1, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(seq2seq_data.shift_right(targets, positions, segments, bos_id=2),
                                [[2, 5, 6, 2, 7, 0]])


class _Words:
  """A tokenizer of whitespace words with ids 10, 11, ...; eos 3, bos 2, pad 0."""
  pad_id, bos_id, eos_id = 0, 2, 3

  def encode(self, text):
    return [10 + int(w) for w in text.split()]


def _pairs_cfg(tmp_path, **changes):
  (tmp_path / 'train.src').write_text('1 2 3\n4 5\n6\n7 8 9 9 9 9 9 9\n')
  (tmp_path / 'train.tgt').write_text('1\n4 5 6\n6 6\n7\n')
  for split in ('valid', 'test'):  # named splits: no training line is held out
    (tmp_path / f'{split}.src').write_text('1\n')
    (tmp_path / f'{split}.tgt').write_text('2\n')
  files = ','.join(f'{tmp_path}/{s}.{side}' for s in ('train', 'valid', 'test')
                   for side in ('src', 'tgt'))
  fields = dict(files=files, data_dir=str(tmp_path),
                task='seq2seq', source_key='src', target_key='tgt', seq_len=8, targets_len=6,
                batch_size=2)
  return pipeline.DataConfig(**{**fields, **changes})


def test_packed_rows_keep_each_example_on_one_segment_id_of_both_sides(tmp_path):
  cfg = _pairs_cfg(tmp_path)
  batches = list(seq2seq_data.eval_batches(cfg, _Words(), 'train'))
  rows = [{k: b[k][r] for k in b} for b in batches for r in range(cfg.batch_size)]
  seen = []
  for row in rows:
    for k in range(1, row['inputs_segment_ids'].max() + 1):
      source = row['inputs'][row['inputs_segment_ids'] == k]
      target = row['targets'][row['targets_segment_ids'] == k]
      seen.append((tuple(source), tuple(target)))
      # Each side ends in eos; the decoder reads bos + the target minus its last token.
      decoder = row['decoder_inputs'][row['targets_segment_ids'] == k]
      assert source[-1] == target[-1] == 3 and decoder[0] == 2
      np.testing.assert_array_equal(decoder[1:], target[:-1])
      np.testing.assert_array_equal(row['targets_positions'][row['targets_segment_ids'] == k],
                                    np.arange(len(target)))
    assert row['decoder_inputs'][row['targets_segment_ids'] == 0].sum() == 0
  # Every pair once; the long source is cut to 8 with its eos kept.
  assert len(seen) == 4 and (17, 18, 19, 19, 19, 19, 19, 3) in [s for s, _ in seen]
  assert ((16, 3), (16, 16, 3)) in seen


def test_train_iterator_is_resumable(tmp_path):
  cfg = _pairs_cfg(tmp_path, seed=3)
  it = seq2seq_data.train_iterator(cfg, _Words())
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = seq2seq_data.train_iterator(cfg, _Words())
  again.set_state(state)
  for want in expected:
    got = next(again)
    assert set(got) == set(seq2seq_data.FEATURES)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_keys_are_checked_and_named(tmp_path):
  with pytest.raises(ValueError, match='config.data.target_key'):
    pipeline.text_keys(_pairs_cfg(tmp_path, target_key=''))
  with pytest.raises(KeyError, match="config.data.source_key must be one of"):
    pipeline.data_source(_pairs_cfg(tmp_path, source_key='de'), 'train')


def test_joint_vocabulary_is_named_by_both_sides_and_trained_on_both(tmp_path):
  (tmp_path / 'train.en').write_text('the quick brown fox jumps\n' * 40)
  (tmp_path / 'train.es').write_text('el veloz zorro marron salta\n' * 40)
  cfg = pipeline.DataConfig(files=f'{tmp_path}/train.en,{tmp_path}/train.es',
                            data_dir=str(tmp_path), task='seq2seq', source_key='en',
                            target_key='es', vocab_size=60)
  assert pipeline.dataset_slug(cfg).endswith('-en-es')
  tokenizer = pipeline.load_tokenizer(cfg)
  for word in ('quick', 'zorro'):  # each side's words are whole pieces of the vocabulary
    assert len(tokenizer.encode(word)) <= 2, word


def test_source_rows_mark_real_tokens_by_segment_not_by_id():
  tokens, segments = seq2seq_data.source_rows(_Words(), ['1 2', '', '3'], length=4)
  np.testing.assert_array_equal(tokens, [[11, 12, 3, 0], [3, 0, 0, 0], [13, 3, 0, 0]])
  np.testing.assert_array_equal(segments, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])


def test_bible_en_es_pairs(real_data_dir):
  cfg = pipeline.DataConfig(name='bible/en_es', task='seq2seq', source_key='en',
                            target_key='es', data_dir=str(real_data_dir))
  pairs = seq2seq_data.pair_texts(cfg, 'test', max_examples=3)
  assert len(pairs) == 3 and all(s and t for s, t in pairs)


def test_a_tfds_translation_dataset_by_name(tmp_path):
  """wmt14_translate/de-en through TFDS's mock data: its own features, a joint vocabulary."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = pipeline.DataConfig(name='wmt14_translate/de-en', task='seq2seq', source_key='de',
                            target_key='en', data_dir=str(tmp_path), vocab_size=60,
                            seq_len=16, batch_size=2)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    tokenizer = pipeline.load_tokenizer(cfg)
    batch = next(seq2seq_data.train_iterator(cfg, tokenizer))
    pairs = seq2seq_data.pair_texts(cfg, 'validation', max_examples=2)
  assert (tmp_path / 'tokenizers' / 'wmt14_translate_de-en-de-en_bpe_60.model').exists()
  assert batch['inputs'].shape == (2, 16) and batch['targets_segment_ids'][0, 0] == 1
  assert len(pairs) == 2
