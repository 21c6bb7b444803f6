"""Encoder tasks: pair layout, NSP, FULL-SENTENCES, static masking, fine-tuning tasks,
GLUE by name, and the grain iterators (resume, hosts' rows, eval padding)."""

import dataclasses

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from sklearn import metrics

from data import encoder_data
from data import pipeline
from data import tasks
from data.pipeline import DataConfig

PAD, BOS, EOS, MASK, SEP, CLS = 0, 2, 3, 4, 5, 6


class ToyTokenizer:
  """Words that are numbers are their own ids; other words hash into 7..96. Even ids start
  words (so word_starts is visible)."""
  pad_id, unk_id, bos_id, eos_id, mask_id, sep_id, cls_id = 0, 1, 2, 3, 4, 5, 6
  special_ids = (0, 1, 2, 3, 4, 5, 6)
  vocab_size = 10_000

  def encode(self, text):
    return [int(w) if w.isdigit() else 7 + sum(map(ord, w)) % 90 for w in text.split()]

  def word_starts(self, ids):
    return np.asarray(ids) % 2 == 0


TOY = ToyTokenizer()


# ---------------------------------------------------------------------------------------
# The converter.

def _truncate_by_loop(la, lb, budget):
  while la + lb > budget:  # Hugging Face's longest_first: the longer one, b on a tie
    if la > lb:
      la -= 1
    else:
      lb -= 1
  return la, lb


def test_truncate_longest_first_matches_one_by_one_removal():
  for la in range(12):
    for lb in range(12):
      for budget in range(20):
        assert tasks.truncate_longest_first(la, lb, budget) == _truncate_by_loop(la, lb, budget)


def test_pair_layout_exact():
  f = tasks.pair_features(TOY, [11, 12, 13], [21, 22], 10)
  np.testing.assert_array_equal(f['inputs'], [CLS, 11, 12, 13, SEP, 21, 22, SEP, PAD, PAD])
  np.testing.assert_array_equal(f['token_types'], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(f['segment_ids'], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(f['positions'], [0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
  # Specials and each text's first token start words; odd ids continue one; padding 0.
  np.testing.assert_array_equal(f['word_starts'], [1, 1, 1, 0, 1, 1, 1, 1, 0, 0])
  assert all(v.dtype == np.int32 for v in f.values())


def test_pair_truncates_the_longer_side_first():
  f = tasks.pair_features(TOY, [10, 11, 12, 13, 14, 15], [20, 21], 8)  # 5 of 8 for texts
  np.testing.assert_array_equal(f['inputs'], [CLS, 10, 11, 12, SEP, 20, 21, SEP])
  f = tasks.pair_features(TOY, [10, 11, 12, 13, 14, 15], [20, 21, 22, 23], 8)
  np.testing.assert_array_equal(f['inputs'], [CLS, 10, 11, 12, SEP, 20, 21, SEP])
  np.testing.assert_array_equal(f['token_types'], [0, 0, 0, 0, 0, 1, 1, 1])


def test_single_text_layout():
  f = tasks.pair_features(TOY, [10, 11, 12, 13], None, 5)
  np.testing.assert_array_equal(f['inputs'], [CLS, 10, 11, 12, SEP])
  assert not f['token_types'].any() and f['segment_ids'].all()


# ---------------------------------------------------------------------------------------
# NSP and FULL-SENTENCES on a toy corpus: sentence g is [100 + g] * length, so every token
# names its sentence.

DOC_SIZES = (4, 3, 5, 2, 4, 3)   # sentences per document
DOC_BOOKS = (0, 0, 1, 1, 2, 3)   # documents ordered by book


def _toy_documents(length=lambda g: 1 + g % 4):
  docs, g = [], 0
  for size, book in zip(DOC_SIZES, DOC_BOOKS):
    docs.append((book, [' '.join([str(100 + g + i)] * length(g + i)) for i in range(size)]))
    g += size
  return docs


@pytest.fixture(scope='module')
def toy_corpus():
  return tasks.build_corpus(TOY, _toy_documents())


def _sentences(tokens):
  """Sentence ids of consecutive runs of tokens."""
  return [int(t) - 100 for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1]]


def test_nsp_pairs_follow_or_come_from_another_book(toy_corpus):
  c = toy_corpus
  source = tasks.NspSource(c, TOY, seq_len=16, short_seq_prob=0.1)
  assert len(source) == sum(DOC_SIZES) - len(DOC_SIZES)
  book_of = c.doc_book[c.doc_of]
  labels = []
  for epoch in range(40):
    for i in range(len(source)):
      f = source.example(i, epoch, seed=3)
      types, ids = f['token_types'], f['inputs']
      n = int(f['segment_ids'].sum())
      sep = np.flatnonzero(ids == SEP)
      assert ids[0] == CLS and len(sep) == 2 and sep[1] == n - 1
      np.testing.assert_array_equal(types[:n], (np.arange(n) > sep[0]).astype(int))
      a, b = _sentences(ids[1:sep[0]]), _sentences(ids[sep[0] + 1:n - 1])
      assert a[0] == source.firsts[i] and a == list(range(a[0], a[0] + len(a)))
      if f['nsp_label'] == 0:  # the next sentences of the same document
        assert b == list(range(a[-1] + 1, a[-1] + 1 + len(b)))
        assert c.doc_of[b[-1]] == c.doc_of[a[0]]
      else:
        assert {book_of[s] for s in b} == {book_of[b[0]]} != {book_of[a[0]]}
      labels.append(int(f['nsp_label']))
  # Half random: 400 draws, binomial std 10; 5 std either way.
  assert abs(np.sum(labels) - len(labels) / 2) < 5 * np.sqrt(len(labels)) / 2


def test_nsp_example_depends_only_on_its_key(toy_corpus):
  source = tasks.NspSource(toy_corpus, TOY, seq_len=16, short_seq_prob=0.1)
  same = [source.example(5, 2, 7), source.example(5, 2, 7)]
  for k in same[0]:
    np.testing.assert_array_equal(same[0][k], same[1][k])
  others = [source.example(5, e, 7)['inputs'] for e in range(10)]
  assert len({o.tobytes() for o in others}) > 1  # the epoch changes the pair


def test_full_sentences_rows(toy_corpus):
  source = tasks.FullSentencesSource(toy_corpus, TOY, seq_len=12)
  rows = [source.example(i, 0, 0) for i in range(len(source))]
  stream, crossed = [], False
  for f in rows:
    n = int(f['segment_ids'].sum())
    np.testing.assert_array_equal(f['segment_ids'], np.arange(12) < n)  # padding at the end
    np.testing.assert_array_equal(f['positions'][:n], np.arange(n))
    ids = f['inputs']
    assert ids[0] == BOS and ids[n - 1] == EOS and (ids[n:] == PAD).all()
    inner = list(ids[1:n - 1])
    assert inner[0] != EOS and inner[-1] != EOS  # separators only between documents
    crossed |= EOS in inner
    stream.append(inner)
  assert crossed
  # The rows, joined, are the whole corpus in order with a separator between documents
  # wherever two documents meet inside a row; and no sentence is split.
  expected, g = [], 0
  for d, size in enumerate(DOC_SIZES):
    doc = []
    for s in range(g, g + size):
      doc.append([100 + s] * (1 + s % 4))
    expected.append(doc)
    g += size
  flat_rows = [t for r in stream for t in r if t != EOS]
  assert flat_rows == [t for doc in expected for s in doc for t in s]
  for r in stream:
    sentences = _sentences([t for t in r if t != EOS])
    counts = [sum(1 for t in r if t == 100 + s) for s in sentences]
    assert counts == [1 + s % 4 for s in sentences]  # whole sentences only
    for k, t in enumerate(r):
      if t == EOS:  # the separator sits exactly between two documents
        assert toy_corpus.doc_of[r[k - 1] - 100] + 1 == toy_corpus.doc_of[r[k + 1] - 100]
  # Greedy: the next row's first sentence would not have fit into this row.
  for r, nxt in zip(stream, stream[1:]):
    first = _sentences(nxt)[0]
    sep = int(toy_corpus.doc_of[first] != toy_corpus.doc_of[_sentences(r)[-1]])
    assert len(r) + sep + (1 + first % 4) > 12 - 2


def test_full_sentences_cuts_overlong_sentences():
  corpus = tasks.build_corpus(TOY, _toy_documents(length=lambda g: 13 if g == 2 else 2))
  source = tasks.FullSentencesSource(corpus, TOY, seq_len=8)
  inner = [t for i in range(len(source))
           for t in source.example(i, 0, 0)['inputs'] if t not in (PAD, BOS, EOS)]
  assert inner.count(102) == 13  # no token lost


# ---------------------------------------------------------------------------------------
# The iterators, on a toy task (any object with name, mask_fn, dupe_factor, source()).

@dataclasses.dataclass(frozen=True)
class ToyTask:
  name: str = 'toy'
  layout: str = 'nsp'
  mask_fn: object = None
  dupe_factor: int = 1

  def source(self, cfg, tokenizer, split):
    corpus = tasks.build_corpus(tokenizer, _toy_documents())
    if self.layout == 'nsp':
      return tasks.NspSource(corpus, tokenizer, cfg.seq_len, short_seq_prob=0.1)
    return tasks.FullSentencesSource(corpus, tokenizer, cfg.seq_len)


TOY_CFG = DataConfig(seq_len=16, batch_size=4, seed=1)  # 15 NSP examples per epoch


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_resume_gives_identical_next_batches(tmp_path):
  it = encoder_data.task_train_iterator(ToyTask(), TOY_CFG, TOY)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 6)  # crosses into the next epochs
  fresh = encoder_data.task_train_iterator(ToyTask(), TOY_CFG, TOY)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 6), expected)
  # And through an Orbax checkpoint, as training saves it.
  it.set_state(state)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  restored = encoder_data.task_train_iterator(ToyTask(), TOY_CFG, TOY)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_batches_equal(_take(restored, 6), expected)


def test_epochs_are_reshuffled_permutations():
  cfg = DataConfig(seq_len=12, batch_size=1, seed=0)
  n = len(ToyTask(layout='full_sentences').source(cfg, TOY, 'train'))
  it = encoder_data.task_train_iterator(ToyTask(layout='full_sentences'), cfg, TOY)
  epochs = [[next(it)['inputs'][0].tobytes() for _ in range(n)] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
  assert len(set(epochs[0])) == n


def test_train_examples_keeps_the_first_k_and_cycles_through_them():
  cfg = DataConfig(seq_len=12, batch_size=1, seed=0)
  task = ToyTask(layout='full_sentences')
  source = task.source(cfg, TOY, 'train')
  first = {source.example(i, 0, 0)['inputs'].tobytes() for i in range(3)}
  limited = dataclasses.replace(cfg, train_examples=3)
  it = encoder_data.task_train_iterator(task, limited, TOY)
  epochs = [[next(it)['inputs'][0].tobytes() for _ in range(3)] for _ in range(2)]
  assert set(epochs[0]) == set(epochs[1]) == first
  with pytest.raises(ValueError, match='train_examples=-1'):
    encoder_data.task_train_iterator(task, dataclasses.replace(cfg, train_examples=-1), TOY)


def test_two_hosts_rows_make_the_global_batch():
  cfg = DataConfig(seq_len=16, batch_size=4, seed=2)
  whole = _take(encoder_data.task_train_iterator(ToyTask(), cfg, TOY), 3)
  hosts = [_take(encoder_data.task_train_iterator(ToyTask(), cfg, TOY, rows=r), 3)
           for r in ([0, 1], [2, 3])]
  for k, batch in enumerate(whole):
    for key, value in batch.items():
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][k][key], hosts[1][k][key]]), value)
  evals = [list(encoder_data.task_eval_batches(ToyTask(), cfg, TOY, 'validation',
                                               shard_index=h, shard_count=2))
           for h in range(2)]
  for k, batch in enumerate(encoder_data.task_eval_batches(ToyTask(), cfg, TOY, 'validation')):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([evals[0][k][key], evals[1][k][key]]),
                                    value)


def test_eval_batches_count_every_example_once():
  cfg = DataConfig(seq_len=16, batch_size=4, seed=5)
  batches = list(encoder_data.task_eval_batches(ToyTask(), cfg, TOY, 'validation'))
  assert len(batches) == 4  # 15 examples
  weights = np.concatenate([b['example_weight'] for b in batches])
  np.testing.assert_array_equal(weights, np.arange(16) < 15)
  last = batches[-1]
  assert not last['segment_ids'][3].any() and (last['inputs'][3] == PAD).all()
  firsts = [int(b['inputs'][r, 1]) - 100 for b in batches for r in range(4) if
            b['example_weight'][r]]
  source = ToyTask().source(cfg, TOY, 'validation')
  assert firsts == list(source.firsts)  # in order, each once
  again = list(encoder_data.task_eval_batches(ToyTask(), DataConfig(seq_len=16, batch_size=4,
                                                                    seed=9), TOY, 'test'))
  _assert_batches_equal(again, batches)  # the run's seed does not change the eval set
  assert len(list(encoder_data.task_eval_batches(ToyTask(), cfg, TOY, 'validation',
                                                 max_batches=2))) == 2


def _first_maskable(inputs, maskable, word_starts, seed):
  """A trivial mask_fn: masks the maskable token chosen by the seed."""
  del word_starts
  where = np.flatnonzero(maskable)
  k = where[np.random.default_rng(seed).integers(len(where))]
  targets, weights = np.zeros_like(inputs), np.zeros(len(inputs), np.float32)
  targets[k], weights[k] = inputs[k], 1.0
  inputs = inputs.copy()
  inputs[k] = MASK
  return inputs, targets, weights


def test_static_masking_repeats_every_dupe_factor_epochs():
  task = ToyTask(mask_fn=_first_maskable, dupe_factor=2)
  cfg = DataConfig(seq_len=16, batch_size=5, seed=4)  # 15 examples: 3 batches an epoch
  it = encoder_data.task_train_iterator(task, cfg, TOY)
  epochs = []
  for _ in range(4):
    rows = {}
    for b in _take(it, 3):
      for r in range(5):
        assert b['inputs'][r][b['mlm_weights'][r] > 0].tolist() == [MASK]
        assert b['mlm_targets'][r][b['mlm_weights'][r] > 0] > 6  # never a special
        key = int(b['inputs'][r, 1] if b['inputs'][r, 1] != MASK else b['mlm_targets'][r, 1])
        rows[key] = {k: v[r].tobytes() for k, v in b.items()}
    epochs.append(rows)
  assert epochs[0] == epochs[2] and epochs[1] == epochs[3]  # copy = epoch % 2
  assert epochs[0] != epochs[1]
  assert sorted(epochs[0]) == sorted(epochs[1])  # the same examples, other masks/pairs


# ---------------------------------------------------------------------------------------
# The real corpus: bible/kjv_web's validation split.

@pytest.fixture(scope='module')
def real(real_data_dir):
  cfg = DataConfig(data_dir=str(real_data_dir), seq_len=32, batch_size=8, vocab_size=512)
  return cfg, pipeline.load_tokenizer(cfg)


def test_real_nsp_pairs(real):
  cfg, tok = real
  source = tasks.TASKS['nsp'].source(cfg, tok, 'validation')
  labels = [int(source.example(i, 0, 0)['nsp_label']) for i in range(0, len(source), 3)]
  assert abs(np.mean(labels) - 0.5) < 5 * 0.5 / np.sqrt(len(labels))
  both = tasks.PretrainingTask('nsp_kjv_web', translations=('kjv', 'web'))
  assert len(both.source(cfg, tok, 'validation')) == 2 * len(source)  # a document each
  batch = next(encoder_data.task_train_iterator('nsp', cfg, tok, split='validation'))
  assert batch['inputs'].shape == (8, 32) and (batch['inputs'][:, 0] == tok.cls_id).all()


def test_real_full_sentences_cross_documents(real):
  cfg, tok = real
  cfg = dataclasses.replace(cfg, seq_len=128)  # room for a chapter's end and the next's start
  source = tasks.TASKS['full_sentences'].source(cfg, tok, 'validation')
  rows = [source.example(i, 0, 0) for i in range(len(source))]
  seps = [np.count_nonzero(f['inputs'][1:int(f['segment_ids'].sum()) - 1] == tok.eos_id)
          for f in rows]
  assert sum(seps) > 0
  used = np.asarray([f['segment_ids'].sum() for f in rows])
  # Full rows: a row wastes on average half a verse (~30 tokens) that would not fit.
  assert np.mean(used) > 0.7 * cfg.seq_len


def test_real_finetuning_tasks_and_baselines(real):
  cfg, _ = real
  records = tasks.verses(cfg.data_dir, 'validation')
  para = tasks.TASKS['paraphrase'].split_examples(cfg.data_dir, 'validation')
  assert len(para) == len(records)
  for i, (e, r) in enumerate(zip(para, records)):
    assert e['sentence1'] == r[3]
    if e['label'] == 1:
      assert e['sentence2'] == r[4]
    else:  # another verse of the same chapter
      assert e['sentence2'] in {o[4] for j, o in enumerate(records)
                                if o[:2] == r[:2] and j != i and abs(j - i) < 200}
  trans = tasks.TASKS['translation'].split_examples(cfg.data_dir, 'validation')
  assert all(e['sentence'] == r[3 + e['label']] for e, r in zip(trans, records))
  genre = tasks.TASKS['genre'].split_examples(cfg.data_dir, 'validation')
  assert {e['label'] for e in genre} == {tasks.GENRES.index(g)
                                         for g in ('history', 'prophecy', 'gospel', 'letter')}
  for name, examples in (('paraphrase', para), ('translation', trans), ('genre', genre)):
    labels = np.asarray([e['label'] for e in examples])
    if name != 'genre':
      assert abs(labels.mean() - 0.5) < 5 * 0.5 / np.sqrt(len(labels))
    result = tasks.baseline(name, 'validation', data_dir=cfg.data_dir)
    train = [e['label'] for e in tasks.TASKS[name].split_examples(cfg.data_dir, 'train')]
    majority = np.bincount(train).argmax()
    assert result['majority'] == majority
    assert result['accuracy'] == pytest.approx(np.mean(labels == majority))
    average = 'macro' if name == 'genre' else 'binary'
    assert result['f1'] == pytest.approx(metrics.f1_score(
        labels, np.full_like(labels, majority), average=average, zero_division=0))


def _toy_examples(data_dir, split, seed):
  del data_dir, seed
  labels = {'train': [1, 1, 1, 0, 2], 'validation': [0, 0, 1, 2]}[split]
  return [{'sentence': str(10 + i), 'label': y} for i, y in enumerate(labels)]


def test_baseline_predicts_the_training_majority():
  binary = tasks.ClassificationTask('toy2', ('sentence',), 2, lambda *a: [
      {**e, 'label': min(e['label'], 1)} for e in _toy_examples(*a)])
  # Train's majority 1 is right on 2 of the 4 validation labels 0, 0, 1, 1: accuracy 1/2,
  # F1 of class 1 = 2PR/(P+R) with P = 1/2, R = 1.
  assert tasks.baseline(binary, 'validation', data_dir='x') == pytest.approx(
      {'majority': 1, 'accuracy': 1 / 2, 'f1': 2 / 3})
  flipped = tasks.ClassificationTask('toy2f', ('sentence',), 2, lambda *a: [
      {**e, 'label': 1 - min(e['label'], 1)} for e in _toy_examples(*a)])
  # Majority 0 never predicts class 1: its F1 is 0 (sklearn's zero_division=0).
  assert tasks.baseline(flipped, 'validation', data_dir='x') == pytest.approx(
      {'majority': 0, 'accuracy': 1 / 2, 'f1': 0.0})
  three = tasks.ClassificationTask('toy3', ('sentence',), 3, _toy_examples)
  assert tasks.baseline(three, 'validation', data_dir='x') == pytest.approx(
      {'majority': 1, 'accuracy': 1 / 4, 'f1': 0.4 / 3})  # macro over 3 present classes
  regression = tasks.ClassificationTask('toyr', ('sentence',), 0, _toy_examples)
  assert tasks.baseline(regression, 'validation', data_dir='x') == pytest.approx(
      {'mean': 1.0, 'mse': (1 + 1 + 0 + 1) / 4})


# ---------------------------------------------------------------------------------------
# GLUE by name, on tfds' mock data (no TensorFlow, nothing prepared).

@pytest.mark.parametrize('name', ['glue/sst2', 'glue/mrpc', 'glue/stsb'])
def test_glue_tasks_on_mock_data(name, tmp_path):
  cfg = DataConfig(data_dir=str(tmp_path), seq_len=24, batch_size=4)
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    batches = list(encoder_data.task_eval_batches(name, cfg, TOY, 'validation'))
  task = tasks.TASKS[name]
  assert len(batches) == 2 and batches[1]['example_weight'].tolist() == [1, 0, 0, 0]
  label = batches[0]['label']
  assert label.dtype == (np.float32 if name == 'glue/stsb' else np.int32)
  pair = len(task.text_keys) == 2
  assert (batches[0]['token_types'].any(axis=1) == pair).all()
  assert (np.count_nonzero(batches[0]['inputs'] == SEP, axis=1) == 1 + pair).all()
