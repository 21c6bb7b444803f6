"""Encoder-decoder pretraining rows: each task's pairs, chunking, seeds, packing, resume."""

import dataclasses

import grain
import numpy as np
import pytest

from data import bart_noising
from data import denoising_data
from data import pipeline
from data import seq2seq_data
from data import span_corruption


class _Words:
  """Whitespace words '10'.. as ids 10..; pad 0, bos 2, eos 3, [MASK] 4; '.' ends a
  sentence (id 9)."""
  pad_id, bos_id, eos_id, mask_id = 0, 2, 3, 4
  special_ids = (0, 1, 2, 3, 4, 5, 6)
  vocab_size = 100

  def encode(self, text):
    return [9 if w == '.' else int(w) for w in text.split()]

  def decode(self, ids):
    return ' '.join('.' if i == 9 else str(i) for i in ids)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> dict[str, str]:
  """A parallel corpus of 40 lines of 5..33 words (the 'es' side with sentences), prepared
  once for the module."""
  root = tmp_path_factory.mktemp('corpus')
  lines = [' '.join(str(10 + (i + j) % 80) for j in range(5 + 7 * (i % 5))) for i in range(40)]
  (root / 'train.en').write_text('\n'.join(lines) + '\n')
  (root / 'train.es').write_text('\n'.join(f'{l} . 11 .' for l in lines) + '\n')
  for split in ('valid', 'test'):
    for side in ('en', 'es'):
      (root / f'{split}.{side}').write_text('10 11 12\n')
  files = ','.join(f'{root}/{s}.{side}' for s in ('train', 'valid', 'test')
                   for side in ('en', 'es'))
  return dict(files=files, data_dir=str(root))


@pytest.fixture(autouse=True)
def _no_window_shuffle(monkeypatch):
  # The window of shuffled rows would read ~1000 rows before the first batch.
  monkeypatch.setattr(pipeline, 'SHUFFLE_WINDOW_ROWS', 0)


def _cfg(corpus, **changes):
  fields = dict(corpus, text_key='en,es', seq_len=16, batch_size=4, extra_ids=10,
                task='span_corruption')
  return pipeline.DataConfig(**{**fields, **changes})


def test_text_keys_reads_several_features(corpus):
  assert pipeline.text_keys(_cfg(corpus)) == ('en', 'es')
  with pytest.raises(ValueError, match='text_key'):
    pipeline.text_keys(_cfg(corpus, text_key='en,'))


def _pairs(cfg, split='train'):
  task = denoising_data.denoising_task(cfg, _Words())
  rows = []
  for batch in seq2seq_data.eval_batches(cfg, _Words(), split, task=task):
    for r in range(cfg.batch_size):
      for k in range(1, batch['inputs_segment_ids'][r].max() + 1):
        rows.append((batch['inputs'][r][batch['inputs_segment_ids'][r] == k],
                     batch['targets'][r][batch['targets_segment_ids'][r] == k]))
  return task, rows


def test_span_corruption_rows_fill_and_restore_each_chunk(corpus):
  cfg = _cfg(corpus)
  task, rows = _pairs(cfg)
  raw, targets_len = span_corruption.lengths_for(16)
  assert task.lengths() == (16, targets_len)
  sentinels = set(span_corruption.sentinel_ids(_Words.vocab_size + 10, 10).tolist())
  full_rows = 0
  for inputs, targets in rows:
    # Merging the sentinels' spans back gives the original chunk: inputs and targets
    # alternate, sentinel by sentinel.
    spans = {}
    key = None
    for t in targets[:-1]:
      key = t if t in sentinels else key
      if t not in sentinels:
        spans.setdefault(key, []).append(t)
    restored = [x for t in inputs[:-1] for x in (spans.get(t, []) if t in sentinels else [t])]
    assert inputs[-1] == targets[-1] == 3 and len(restored) <= raw
    assert all(t not in sentinels for t in restored)
    full_rows += len(inputs) == 16
  # Chunks of `raw` tokens fill their input rows exactly.
  assert full_rows >= 10


def test_each_task_pairs_text_and_its_corruption(corpus):
  masks = changes = chosen = 0
  for task_name in ('prefix_lm', 'mlm_denoising', 'bart_denoising'):
    cfg = _cfg(corpus, task=task_name, noising='mask=0.3')
    task, rows = _pairs(cfg)
    assert task.lengths() == (16, 16)
    for inputs, targets in rows:
      assert inputs[-1] == targets[-1] == 3 and len(inputs) <= 16 and len(targets) <= 16
      if task_name == 'prefix_lm':
        # The text cut in two: inputs then targets spell one chunk of a document.
        assert len(inputs) >= 2 and len(targets) >= 2
      elif task_name == 'mlm_denoising':
        assert len(inputs) == len(targets)
        # ⌈0.15 n⌉ tokens chosen; 80% of them [MASK], 10% random, 10% kept.
        chosen += np.ceil(0.15 * (len(targets) - 1))
        changes += (inputs != targets).sum()
        masks += (inputs == 4).sum()
      else:
        # BART: [BOS] + text masked at ⌈0.3 n⌉ places; targets the text.
        assert inputs[0] == 2 and len(inputs) == len(targets) + 1
        masked = inputs[1:-1] == 4
        assert masked.sum() == np.ceil(0.3 * (len(targets) - 1))
        np.testing.assert_array_equal(inputs[1:-1][~masked], targets[:-1][~masked])
  assert changes <= chosen and 0.65 < masks / chosen < 0.95, (masks, changes, chosen)


def test_prefix_lm_joins_back_into_the_documents(corpus):
  cfg = _cfg(corpus, task='prefix_lm')
  _, rows = _pairs(cfg)
  chunks = {tuple(np.concatenate([i[:-1], t[:-1]])) for i, t in rows}
  # Line 0 is '10 ... 14' (one chunk), line 4 '14 ... 46' (chunks of 15: the first is
  # '14 ... 28').
  assert tuple(range(10, 15)) in chunks and tuple(range(14, 29)) in chunks


def test_bart_permutation_uses_the_tokenizers_sentence_ends(corpus):
  assert denoising_data.sentence_end_ids(_Words()) == (9,)
  cfg = _cfg(corpus, task='bart_denoising', noising='permute', text_key='es')
  _, rows = _pairs(cfg)
  moved = 0
  for inputs, targets in rows:
    # Same tokens, sentences reordered: the multiset is kept.
    assert sorted(inputs[1:-1]) == sorted(targets[:-1])
    moved += not np.array_equal(inputs[1:-1], targets[:-1])
  assert moved > 0


def test_noise_is_a_function_of_the_seed_and_the_place_in_the_stream(corpus):
  cfg = _cfg(corpus, task='mlm_denoising')
  task = denoising_data.denoising_task(cfg, _Words())
  first = next(seq2seq_data.train_iterator(cfg, _Words(), task=task))
  again = next(seq2seq_data.train_iterator(cfg, _Words(), task=task))
  # Another seed of the noise alone (the records come in the same order).
  other = next(seq2seq_data.train_iterator(cfg, _Words(), task=dataclasses.replace(task, seed=1)))
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  np.testing.assert_array_equal(np.sort(first['targets'][first['targets'] < 100]),
                                np.sort(first['targets'][first['targets'] < 100]))
  assert not np.array_equal(first['inputs'], other['inputs'])


def test_resumed_iterator_redraws_the_same_noise(corpus):
  cfg = _cfg(corpus)
  task = denoising_data.denoising_task(cfg, _Words())
  it = seq2seq_data.train_iterator(cfg, _Words(), task=task)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(12)]  # past the end of the first epoch
  resumed = seq2seq_data.train_iterator(cfg, _Words(), task=task)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_epochs_draw_fresh_noise(corpus):
  # The same record in two epochs is corrupted differently: the seed counts the place in
  # the endless stream, not the record.
  cfg = _cfg(corpus, task='mlm_denoising')
  task = denoising_data.denoising_task(cfg, _Words())
  records = pipeline.EpochShuffle(grain.MapDataset.source(pipeline.data_source(cfg, 'train')),
                                  seed=0)
  record = records[0]
  again = 40 + int(np.flatnonzero(records._permutation(1) == records._permutation(0)[0])[0])
  assert records[again] == record
  documents = records.map_with_index(denoising_data._Documents(_Words(), ('en',)))
  corrupt = denoising_data._Corrupt(task.corruption, seed=0)
  first, second = corrupt.flat_map(documents[0]), corrupt.flat_map(documents[again])
  np.testing.assert_array_equal(first[0]['targets'], second[0]['targets'])
  assert not np.array_equal(first[0]['inputs'], second[0]['inputs'])


def test_bad_settings_name_the_field(corpus):
  with pytest.raises(ValueError, match='extra_ids'):
    denoising_data.denoising_task(_cfg(corpus, extra_ids=0), _Words())
  with pytest.raises(ValueError, match='extra_ids=1:'):
    denoising_data.denoising_task(_cfg(corpus, extra_ids=1, seq_len=64), _Words())
  with pytest.raises(ValueError, match='targets_len=3'):
    denoising_data.denoising_task(_cfg(corpus, targets_len=3), _Words())
  with pytest.raises(ValueError, match="cannot read 'shuffle'"):
    denoising_data.denoising_task(_cfg(corpus, task='bart_denoising', noising='shuffle'),
                                  _Words())


def test_bart_spec_parses_every_function():
  assert bart_noising.parse('infill=0.3,permute') == bart_noising.BartNoising(
      infill_rate=0.3, permute_sentences=True)
  assert bart_noising.parse('mask=0.1, delete=0.2,lambda=2,rotate') == bart_noising.BartNoising(
      mask_rate=0.1, delete_rate=0.2, poisson_lambda=2.0, rotate=True)
  assert bart_noising.parse('none') == bart_noising.parse('') == bart_noising.BartNoising()
  with pytest.raises(ValueError, match="mask='x'"):
    bart_noising.parse('mask=x')
