"""Decoder-only prefix-LM rows: one example per row, [bos] prefix continuation [eos], the
prefix length and the loss weights; the encoder-decoder task's split and seeds; resume."""

import numpy as np
import pytest

from data import decoder_prefix_lm
from data import denoising_data
from data import pipeline


class _Words:
  """Whitespace words '10'.. as ids 10..; pad 0, bos 2, eos 3."""
  pad_id, bos_id, eos_id = 0, 2, 3
  vocab_size = 100

  def encode(self, text):
    return [int(w) for w in text.split()]

  def decode(self, ids):
    return ' '.join(str(i) for i in ids)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> dict[str, str]:
  """A parallel corpus of 30 lines of 3..27 words, prepared once for the module."""
  root = tmp_path_factory.mktemp('corpus')
  lines = [' '.join(str(10 + (i + j) % 80) for j in range(3 + 6 * (i % 5))) for i in range(30)]
  (root / 'train.en').write_text('\n'.join(lines) + '\n')
  (root / 'train.es').write_text('\n'.join(f'{l} 11' for l in lines) + '\n')
  for split in ('valid', 'test'):
    for side in ('en', 'es'):
      (root / f'{split}.{side}').write_text('10 11 12\n13 14\n')
  files = ','.join(f'{root}/{s}.{side}' for s in ('train', 'valid', 'test')
                   for side in ('en', 'es'))
  return dict(files=files, data_dir=str(root))


@pytest.fixture(autouse=True)
def _no_window_shuffle(monkeypatch):
  # Rows in the order of the records, so that they can be checked one by one.
  monkeypatch.setattr(pipeline, 'SHUFFLE_WINDOW_ROWS', 0)


def _cfg(corpus, **changes):
  fields = dict(corpus, text_key='en,es', seq_len=12, batch_size=4, task='prefix_lm', seed=5)
  return pipeline.DataConfig(**{**fields, **changes})


def test_a_row_by_hand():
  row = decoder_prefix_lm.make_row(np.array([10, 11, 12]), np.array([13, 14, 3]), seq_len=9,
                                   bos_id=2, pad_id=0)
  np.testing.assert_array_equal(row['inputs'], [2, 10, 11, 12, 13, 14, 3, 0, 0])
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(row['positions'], [0, 1, 2, 3, 4, 5, 6, 0, 0])
  assert int(row['prefix_lengths']) == 4  # [bos] 10 11 12
  # Slot t predicts inputs[t + 1]: slots 3, 4, 5 predict 13, 14 and [eos].
  np.testing.assert_array_equal(row['loss_weights'], [0, 0, 0, 1, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError, match='cannot hold'):
    decoder_prefix_lm.make_row(np.array([10, 11, 12]), np.array([13, 14, 3]), seq_len=6,
                               bos_id=2, pad_id=0)


def _rows(batches):
  """The real rows of batches, each as (inputs, prefix length, loss weights, length)."""
  out = []
  for batch in batches:
    for r in range(len(batch['inputs'])):
      length = int(batch['segment_ids'][r].sum())
      if length:
        out.append((batch['inputs'][r], int(batch['prefix_lengths'][r]),
                    batch['loss_weights'][r], length))
  return out


def test_rows_are_the_encoder_decoder_tasks_examples_end_to_end(corpus):
  cfg = _cfg(corpus)
  rows = _rows(decoder_prefix_lm.eval_batches(cfg, _Words(), 'train'))
  # The examples by hand: each feature of record i in order, chunks of seq_len - 2 tokens,
  # chunk k of feature f split by the encoder-decoder task with seed (seed, i, f, k).
  source = pipeline.data_source(cfg, 'train')
  split = denoising_data.PrefixLMTask(cfg.seq_len - 1, _Words.eos_id)
  expected = []
  for i in range(len(source)):
    for f, key in enumerate(('en', 'es')):
      tokens = np.asarray(_Words().encode(pipeline._text(source[i], key)), np.int32)
      for k, start in enumerate(range(0, len(tokens), cfg.seq_len - 2)):
        prefix, continuation = split(tokens[start:start + cfg.seq_len - 2], (5, i, f, k))
        expected.append((prefix[:-1], continuation))
  assert len(rows) == len(expected) > 60
  cut = 0
  for (inputs, prefix_length, weights, length), (prefix, continuation) in zip(rows, expected):
    np.testing.assert_array_equal(inputs[:length], [2, *prefix, *continuation])
    assert (inputs[length:] == 0).all() and continuation[-1] == 3
    assert prefix_length == 1 + len(prefix)
    # Scored: exactly the predictions of the continuation's tokens, [eos] included.
    np.testing.assert_array_equal(inputs[1:][weights[:-1] == 1], continuation)
    assert weights.sum() == len(continuation)
    cut += len(continuation) < length - 2
  assert cut > 30  # the splits fall at various points


def _take(it, count):
  return [next(it) for _ in range(count)]


def test_training_rows_are_deterministic_resumable_and_fresh_each_epoch(corpus):
  cfg = _cfg(corpus)
  it = decoder_prefix_lm.train_iterator(cfg, _Words())
  first = _take(it, 3)
  state = it.get_state()
  following = _take(it, 40)  # into the second epoch (120 rows, 30 batches, each)
  resumed = decoder_prefix_lm.train_iterator(cfg, _Words())
  resumed.set_state(state)
  for a, b in zip(following, _take(resumed, 40)):
    for k in decoder_prefix_lm.FEATURES:
      np.testing.assert_array_equal(a[k], b[k])
  again = _take(decoder_prefix_lm.train_iterator(cfg, _Words()), 3)
  np.testing.assert_array_equal(np.stack([b['inputs'] for b in first]),
                                np.stack([b['inputs'] for b in again]))
  other = _take(decoder_prefix_lm.train_iterator(_cfg(corpus, seed=6), _Words()), 3)
  assert not np.array_equal(np.stack([b['prefix_lengths'] for b in first]),
                            np.stack([b['prefix_lengths'] for b in other]))
  # A later epoch splits the same texts at other points (the place counts on).
  texts = lambda rows: {tuple(inputs[:length]) for inputs, _, _, length in rows}
  splits = lambda rows: {(tuple(inputs[:length]), p) for inputs, p, _, length in rows}
  epochs = _rows(first + following)
  shared = texts(epochs[:120]) & texts(epochs[120:])
  assert len(shared) > 20 and len(splits(epochs[:120]) & splits(epochs[120:])) < len(shared) / 2


def test_a_host_keeps_its_rows(corpus):
  cfg = _cfg(corpus)
  whole = next(decoder_prefix_lm.train_iterator(cfg, _Words()))
  mine = next(decoder_prefix_lm.train_iterator(cfg, _Words(), rows=[1, 3]))
  for k in decoder_prefix_lm.FEATURES:
    np.testing.assert_array_equal(mine[k], whole[k][[1, 3]])


def test_eval_batches_pad_with_unweighted_rows(corpus):
  cfg = _cfg(corpus, batch_size=8)
  batches = list(decoder_prefix_lm.eval_batches(cfg, _Words(), 'validation'))
  assert len(batches) == 1  # two records of two features: four rows
  batch = batches[0]
  assert batch['prefix_lengths'].shape == (8,) and batch['inputs'].shape == (8, 12)
  assert (batch['segment_ids'][4:] == 0).all() and (batch['loss_weights'][4:] == 0).all()
  assert (batch['prefix_lengths'][4:] == 0).all() and (batch['prefix_lengths'][:4] >= 2).all()


def test_other_tasks_and_short_rows_are_refused(corpus):
  with pytest.raises(ValueError, match="task 'prefix_lm'"):
    decoder_prefix_lm.train_iterator(_cfg(corpus, task='span_corruption'), _Words())
  with pytest.raises(ValueError, match='at least 3'):
    decoder_prefix_lm.eval_batches(_cfg(corpus, seq_len=2), _Words(), 'validation')
