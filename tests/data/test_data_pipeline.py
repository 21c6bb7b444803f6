"""grain pipelines: packing, epochs, determinism, resuming, hosts' rows, eval padding."""

import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from data import pipeline
from data.pipeline import DataConfig

NUM_TRAIN = 40


def _doc(i: int, words: int) -> str:
  # Every word names its document, so no two documents share a chunk of tokens.
  return ' '.join(f'{i}w{j}' for j in range(words))


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  corpus = root / 'corpus'
  corpus.mkdir()
  # Lengths from 1 to 13 words: short documents share rows, long ones span several.
  (corpus / 'train.txt').write_text(
      ''.join(_doc(i, 1 + i % 13) + '\n' for i in range(NUM_TRAIN)))
  (corpus / 'validation.txt').write_text(
      ''.join(_doc(100 + i, 2 + i % 7) + '\n' for i in range(9)))
  (corpus / 'test.txt').write_text(_doc(200, 3) + '\n')
  return DataConfig(files=str(corpus), data_dir=str(root / 'data'), vocab_size=60,
                    seq_len=16, batch_size=4, seed=0)


@pytest.fixture(scope='module')
def tok(cfg):
  return pipeline.load_tokenizer(cfg)


def chunks_of(tok, texts, seq_len):
  """The chunks the pipeline must produce: [bos] + ids + [eos], cut every seq_len."""
  result = []
  for text in texts:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    result += [tuple(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
  return result


def segments(batch):
  """The token tuples of the segments of a batch, checking the packing layout row by row."""
  result = []
  for inputs, seg, pos in zip(batch['inputs'], batch['segment_ids'], batch['positions']):
    used = int(np.count_nonzero(seg))
    assert not seg[used:].any() and not inputs[used:].any() and not pos[used:].any()
    if not used:
      continue  # a padding row
    ids = seg[:used]
    assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # 1, 2, ... in order, no gaps
    for s in range(1, int(ids.max()) + 1):
      where = np.flatnonzero(ids == s)
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # restart at 0
      result.append(tuple(int(t) for t in inputs[where]))
  return result


def doc_of(tok, chunk):
  return int(tok.decode(chunk).split('w')[0])


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_have_static_shape_and_int32(cfg, tok):
  batch = next(pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1))
  assert sorted(batch) == ['inputs', 'positions', 'segment_ids']
  for value in batch.values():
    assert value.shape == (4, 16) and value.dtype == np.int32


def test_packing_keeps_documents_apart_and_loses_nothing(cfg, tok, monkeypatch):
  # Without the row window, the chunks emitted by the end of each batch are exactly a
  # prefix of the (shuffled, repeated) stream of chunks.
  monkeypatch.setattr(pipeline, 'SHUFFLE_WINDOW_ROWS', 0)
  texts = [_doc(i, 1 + i % 13) for i in range(NUM_TRAIN)]
  expected = collections.Counter(chunks_of(tok, texts, cfg.seq_len))
  assert max(map(len, expected)) == 16 and min(map(len, expected)) < 16
  iterator = pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1)
  seen = collections.Counter()
  for batch in take(iterator, 60):
    assert (batch['segment_ids'][:, 0] == 1).all()  # training rows are never empty
    for segment in segments(batch):
      assert segment in expected  # one chunk of one document, never a mix
      seen[segment] += 1
  # Epoch after epoch in order: each chunk seen e or e + 1 times (times its multiplicity:
  # a final chunk holding only eos occurs in several documents).
  epochs = [seen[c] / n for c, n in expected.items()]
  assert min(epochs) >= 2 and max(epochs) - min(epochs) <= 1, epochs


def test_epochs_are_reshuffled(cfg, tok, monkeypatch):
  monkeypatch.setattr(pipeline, 'SHUFFLE_WINDOW_ROWS', 0)
  iterator = pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1)
  order = collections.defaultdict(list)  # doc -> emission indices of its first chunk
  k = 0
  for batch in take(iterator, 60):
    for segment in segments(batch):
      if segment[0] == tok.bos_id:
        order[doc_of(tok, segment)].append(k)
        k += 1
  first = np.argsort(np.argsort([order[d][0] for d in range(NUM_TRAIN)]))
  second = np.argsort(np.argsort([order[d][1] for d in range(NUM_TRAIN)]))
  assert np.corrcoef(first, second)[0, 1] < 0.9  # an unshuffled repeat would be ~1


def test_deterministic_by_seed(cfg, tok):
  a = take(pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1), 8)
  b = take(pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1), 8)
  other = DataConfig(**{**cfg.__dict__, 'seed': 1})
  c = take(pipeline.train_iterator(other, tok, shard_index=0, shard_count=1), 8)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x['inputs'], z['inputs']) for x, z in zip(a, c))


def test_resume_mid_epoch_from_orbax_checkpoint(cfg, tok, tmp_path):
  iterator = pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1)
  take(iterator, 7)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = take(iterator, 5)

  fresh = pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1)
  assert not np.array_equal(next(fresh)['inputs'], expected[0]['inputs'])
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  for want, got in zip(expected, take(fresh, 5)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


@pytest.mark.parametrize('count', [2, 4])
def test_hosts_keep_their_rows_of_the_single_host_batches(cfg, tok, count):
  """Host p of `count` keeps rows p*B/count.. of each global batch: in host order, its rows
  are the one-host batches, and every host's iterator is at the same position."""
  whole = pipeline.train_iterator(cfg, tok)
  hosts = [pipeline.train_iterator(cfg, tok, shard_index=p, shard_count=count)
           for p in range(count)]
  for _ in range(12):  # past the first epoch of the 40 records
    want = next(whole)
    parts = [next(h) for h in hosts]
    assert all(part['inputs'].shape == (4 // count, 16) for part in parts)
    for k in want:
      np.testing.assert_array_equal(want[k], np.concatenate([part[k] for part in parts]))
  assert all(h.get_state() == whole.get_state() for h in hosts)
  # A host resumes from the (common) position exactly.
  resumed = pipeline.train_iterator(cfg, tok, shard_index=1, shard_count=count)
  resumed.set_state(hosts[1].get_state())
  for want, got in zip(take(hosts[1], 3), take(resumed, 3)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_hosts_keep_the_rows_they_are_given(cfg, tok):
  """Rows as a sharding may interleave them: host 0 holds rows 0 and 2, host 1 rows 3 and 1."""
  whole = take(pipeline.train_iterator(cfg, tok), 5)
  even = take(pipeline.train_iterator(cfg, tok, rows=[0, 2]), 5)
  odd = take(pipeline.train_iterator(cfg, tok, rows=[3, 1]), 5)
  for w, e, o in zip(whole, even, odd):
    for k in w:
      np.testing.assert_array_equal(w[k][[0, 2, 3, 1]], np.concatenate([e[k], o[k]]))
  with pytest.raises(ValueError, match='rows of a batch of 4'):
    pipeline.train_iterator(cfg, tok, rows=[2, 4])


def test_batch_size_must_divide_by_shards(cfg, tok):
  with pytest.raises(ValueError, match='not divisible by the 3 data shards'):
    pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=3)


def test_eval_is_one_padded_deterministic_pass(cfg, tok):
  texts = [_doc(100 + i, 2 + i % 7) for i in range(9)]
  padded_rows = 0
  for batch_size in (4, 6, 8, 10):  # at least one leaves the last batch partial
    sized = DataConfig(**{**cfg.__dict__, 'batch_size': batch_size})
    batches = list(pipeline.eval_batches(sized, tok, 'validation'))
    assert all(b[k].shape == (batch_size, 16) for b in batches for k in b)
    got = [s for b in batches for s in segments(b)]
    assert collections.Counter(got) == collections.Counter(chunks_of(tok, texts, 16))
    used = [b['segment_ids'].any(axis=1) for b in batches]
    assert all(u.all() for u in used[:-1])  # only the last batch is padded ...
    last = batches[-1]
    empty = ~used[-1]
    assert not used[-1][np.argmax(empty) if empty.any() else len(empty):].any()  # at the end
    assert not any(last[k][empty].any() for k in last)  # ... with all-zero rows
    padded_rows += int(empty.sum())
  assert padded_rows > 0
  again = list(pipeline.eval_batches(cfg, tok, 'validation'))
  first = list(pipeline.eval_batches(cfg, tok, 'validation'))
  assert all(np.array_equal(a['inputs'], b['inputs']) for a, b in zip(first, again))
  assert len(list(pipeline.eval_batches(cfg, tok, 'validation', max_batches=1))) == 1


def test_eval_shards_split_the_rows_of_the_same_batches(cfg, tok):
  whole = list(pipeline.eval_batches(cfg, tok, 'validation'))
  parts = [list(pipeline.eval_batches(cfg, tok, 'validation', shard_index=i, shard_count=2))
           for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for w, a, b in zip(whole, *parts):
    for k in w:
      np.testing.assert_array_equal(w[k], np.concatenate([a[k], b[k]]))


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'make data.*python -m data\.prepare'):
    pipeline.data_source(DataConfig(data_dir=str(tmp_path)), 'train')
  with pytest.raises(ValueError, match=r"unknown dataset 'bibel/en'"):
    pipeline.data_source(DataConfig(name='bibel/en', data_dir=str(tmp_path)), 'train')


def test_parallel_files_with_text_key(tmp_path):
  (tmp_path / 'train.en').write_text('the cat\nthe dog\na bird\nthe fish\n')
  (tmp_path / 'train.es').write_text('el gato\nel perro\nun pájaro\nel pez\n')
  files = f'{tmp_path}/train.en,{tmp_path}/train.es'
  es = DataConfig(files=files, text_key='es', data_dir=str(tmp_path / 'd'), vocab_size=40,
                  seq_len=8, batch_size=2)
  tok = pipeline.load_tokenizer(es)
  assert pipeline.dataset_slug(es).endswith('-es')
  batch = next(pipeline.train_iterator(es, tok, shard_index=0, shard_count=1))
  assert tok.decode(batch['inputs'][0]) in {'el gato', 'el perro'}  # train keeps 2 lines
  with pytest.raises(KeyError, match=r"no feature 'fr'.*\['en', 'es'\]"):
    pipeline.data_source(DataConfig(**{**es.__dict__, 'text_key': 'fr'}), 'train')


def test_catalog_name_through_mock_data(tmp_path):
  cfg = DataConfig(name='lm1b', data_dir=str(tmp_path), vocab_size=100, seq_len=16,
                   batch_size=2)
  with tfds.testing.mock_data(num_examples=12):
    tok = pipeline.load_tokenizer(cfg)
    batch = next(pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1))
    evaluated = list(pipeline.eval_batches(cfg, tok, 'test', max_batches=2))
  assert (tmp_path / 'tokenizers' / 'lm1b_bpe_100.model').exists()
  assert batch['inputs'].shape == (2, 16) and batch['segment_ids'][0, 0] == 1
  assert batch['inputs'][0, 0] == tok.bos_id and len(evaluated) == 2


def test_data_dir_defaults(monkeypatch):
  monkeypatch.setenv('CONTEXTUAL_DATA_DIR', '/somewhere')
  assert str(pipeline.data_dir(DataConfig())) == '/somewhere'
  assert str(pipeline.data_dir(DataConfig(data_dir='/x'))) == '/x'
  monkeypatch.delenv('CONTEXTUAL_DATA_DIR')
  assert str(pipeline.data_dir(DataConfig())) == '.data'


def test_real_bible_with_the_gpt_config(real_data_dir):
  from configs import gpt
  data = {**gpt.get_config('size=tiny').data.to_dict(), 'data_dir': str(real_data_dir)}
  cfg = DataConfig(**data)
  tok = pipeline.load_tokenizer(cfg)
  assert tok.vocab_size == cfg.vocab_size
  batch = next(pipeline.train_iterator(cfg, tok, shard_index=0, shard_count=1))
  assert batch['inputs'].shape == (cfg.batch_size, cfg.seq_len)
  first = next(iter(pipeline.eval_batches(cfg, tok, 'validation')))
  assert first['inputs'][0, 0] == tok.bos_id and tok.decode(first['inputs'][0])
