"""Text-to-text mixtures: the tasks' records and prefixes, mixing rates (proportional with a
cap, explicit weights), the deterministic schedule, resume, evaluation passes, errors."""

import collections
import dataclasses

import numpy as np
import pytest

from data import pipeline
from data import seq2seq_data
from data import text_to_text

WORDS = ['alpha:', 'beta:', 'gamma:'] + [f'w{i}' for i in range(100)]


class _Vocab:
  """Words of WORDS as ids 10, 11, ...; pad 0, bos 2, eos 3."""
  pad_id, bos_id, eos_id = 0, 2, 3

  def encode(self, text):
    return [10 + WORDS.index(w) for w in text.split()]

  def decode(self, ids):
    return ' '.join(WORDS[i - 10] for i in ids if i >= 10)


def _fake_task(name: str, size: int, metrics=('bleu',)) -> text_to_text.Task:
  """`size` records per split: source 'w<i> w<i+1>', target 'w<i>' (i = the record's index
  within its task, so a record names itself)."""
  def examples(data_dir, split):
    del data_dir
    count = size if split == 'train' else max(1, size // 5)
    return [{'src': f'w{i} w{(i + 1) % 100}', 'tgt': f'w{i}'} for i in range(count)]
  return text_to_text.Task(name, '', 'src', 'tgt', f'{name}: ', metrics, examples=examples)


@pytest.fixture(autouse=True)
def fake_tasks(monkeypatch):
  """Three tasks of 60, 20 and 10 training records in place of the registry."""
  tasks = {t.name: t for t in (_fake_task('alpha', 60), _fake_task('beta', 20),
                               _fake_task('gamma', 10))}
  monkeypatch.setattr(text_to_text, 'TASKS', {**text_to_text.TASKS, **tasks})
  # The window of shuffled rows would read ~1000 rows before the first batch.
  monkeypatch.setattr(pipeline, 'SHUFFLE_WINDOW_ROWS', 0)


def _cfg(**changes) -> pipeline.DataConfig:
  fields = dict(task='text_to_text', mixture='alpha,beta,gamma', seq_len=8, targets_len=4,
                batch_size=4, seed=0)
  return pipeline.DataConfig(**{**fields, **changes})


def _task_of(record) -> str:
  return record['inputs'].split(':')[0]


def test_records_carry_the_prefix_and_the_source_without_it():
  cfg = _cfg()
  record = text_to_text.records(cfg, text_to_text.get('beta'), 'train')[3]
  assert record == {'inputs': 'beta: w3 w4', 'source': 'w3 w4', 'targets': 'w3'}


@pytest.mark.parametrize('mixing, cap, expected', [
    ('proportional', 0, (6, 2, 1)),        # 60 : 20 : 10
    ('proportional', 15, (3, 3, 2)),       # min(n, 15): 15 : 15 : 10
    ('proportional', 100, (6, 2, 1)),      # a cap above every size changes nothing
    ('alpha=1,beta=3,gamma=4', 0, (1, 3, 4)),
    ('gamma=4+alpha=1+beta=3', 0, (1, 3, 4)),  # '+' (config arguments), any order
    ('alpha=0.5,beta=1.5,gamma=0.25', 0, (2, 6, 1)),  # decimals, exactly
])
def test_proportions(mixing, cap, expected):
  cfg = _cfg(mixing=mixing, mixing_cap=cap)
  assert text_to_text.proportions(cfg, [60, 20, 10]) == expected
  rates = text_to_text.rates(cfg, [60, 20, 10])
  assert list(rates) == ['alpha', 'beta', 'gamma']
  np.testing.assert_allclose(list(rates.values()), np.asarray(expected) / sum(expected))


def test_interleave_by_hand():
  # Task 0 takes the places where ⌈k / 4⌉ steps up: 0 and 4; task 1 the rest, in order.
  placed = [text_to_text.interleave(k, (1, 3)) for k in range(8)]
  assert placed == [(0, 0), (1, 0), (1, 1), (1, 2), (0, 1), (1, 3), (1, 4), (1, 5)]
  assert [text_to_text.interleave(k, (1, 1, 2))[0] for k in range(8)] == [0, 1, 2, 2] * 2


@pytest.mark.parametrize('weights', [(1, 3), (6, 2, 1), (3, 3, 2), (7, 5, 11, 2)])
def test_every_prefix_of_the_schedule_keeps_the_rates(weights):
  """Among the first k places task i has k · w_i / W of them, within one per task, and
  its elements are 0, 1, 2, ... in order."""
  places = [text_to_text.interleave(k, weights) for k in range(2000)]
  counts = np.zeros(len(weights))
  for k, (task, element) in enumerate(places):
    assert element == counts[task]
    counts[task] += 1
    np.testing.assert_array_less(
        np.abs(counts - (k + 1) * np.asarray(weights) / sum(weights)), len(weights))


@pytest.mark.parametrize('mixing, cap', [('proportional', 0), ('proportional', 15),
                                         ('alpha=1,beta=3,gamma=4', 0)])
def test_training_stream_mixes_at_the_rates_and_each_task_runs_through_epochs(mixing, cap):
  cfg = _cfg(mixing=mixing, mixing_cap=cap)
  stream = text_to_text.training_stream(cfg)
  rates = text_to_text.rates(cfg, [60, 20, 10])
  n = 1800
  seen = [stream[k] for k in range(n)]
  counts = collections.Counter(_task_of(r) for r in seen)
  for name, rate in rates.items():
    assert abs(counts[name] - n * rate) <= 3, (name, counts[name], n * rate)
  # Each task's records: every one once per epoch, in a fresh order each epoch.
  gamma = [r['targets'] for r in seen if _task_of(r) == 'gamma']
  epochs = [gamma[i:i + 10] for i in range(0, 30, 10)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(f'w{i}' for i in range(10))
  assert epochs[0] != epochs[1]


def test_training_stream_is_exactly_deterministic_and_seeded():
  first = [text_to_text.training_stream(_cfg())[k] for k in range(200)]
  again = [text_to_text.training_stream(_cfg())[k] for k in range(200)]
  other = [text_to_text.training_stream(_cfg(seed=1))[k] for k in range(200)]
  assert first == again
  assert first != other
  # The seed reorders records within tasks, never the tasks' places.
  assert [_task_of(r) for r in first] == [_task_of(r) for r in other]


def test_iterator_resumes_with_the_same_batches():
  cfg = _cfg(mixing='alpha=1,beta=3,gamma=4')
  it = text_to_text.train_iterator(cfg, _Vocab())
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  again = text_to_text.train_iterator(cfg, _Vocab())
  again.set_state(state)
  for want in expected:
    got = next(again)
    assert set(got) == set(seq2seq_data.FEATURES)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_packed_sources_start_with_their_tasks_prefix_and_targets_match():
  cfg = _cfg()
  it = text_to_text.train_iterator(cfg, _Vocab())
  vocab, seen = _Vocab(), collections.Counter()
  for _ in range(10):
    batch = next(it)
    for row in range(cfg.batch_size):
      for k in range(1, batch['inputs_segment_ids'][row].max() + 1):
        source = vocab.decode(batch['inputs'][row][batch['inputs_segment_ids'][row] == k])
        target = vocab.decode(batch['targets'][row][batch['targets_segment_ids'][row] == k])
        prefix, first, _ = source.split()
        assert prefix in ('alpha:', 'beta:', 'gamma:') and target == first
        seen[prefix] += 1
  assert set(seen) == {'alpha:', 'beta:', 'gamma:'}


def test_eval_pass_holds_every_tasks_examples_once_spread_evenly():
  cfg = _cfg()
  stream = text_to_text.split_stream(cfg, 'validation')
  records = [stream[k] for k in range(len(stream))]
  assert len(records) == 12 + 4 + 2
  assert sorted(r['inputs'] for r in records) == sorted(
      r['inputs'] for t in ('alpha', 'beta', 'gamma')
      for r in text_to_text.examples(cfg, text_to_text.get(t), 'validation'))
  # The first half of the pass already reads every task.
  assert {_task_of(r) for r in records[:9]} == {'alpha', 'beta', 'gamma'}
  batches = list(text_to_text.eval_batches(cfg, _Vocab(), 'validation'))
  segments = sum(int(b['inputs_segment_ids'][r].max()) for b in batches for r in range(4))
  assert segments == 18


def test_examples_and_the_majority_target():
  cfg = _cfg()
  task = text_to_text.get('gamma')
  assert text_to_text.examples(cfg, task, 'train', max_examples=2) == [
      {'inputs': 'gamma: w0 w1', 'source': 'w0 w1', 'targets': 'w0'},
      {'inputs': 'gamma: w1 w2', 'source': 'w1 w2', 'targets': 'w1'}]
  assert text_to_text.majority_target(cfg, task) == 'w0'  # all tie: the first in order


def test_tokenizer_texts_and_slug_cover_the_mixture():
  cfg = _cfg(mixture='gamma,beta')
  texts = list(text_to_text.tokenizer_texts(cfg))
  assert len(texts) == 2 * (10 + 20)
  assert texts[:2] == ['gamma: w0 w1', 'w0'] and 'beta: w0 w1' in texts
  assert pipeline.dataset_slug(cfg) == 'text_to_text-beta-gamma'
  assert pipeline.dataset_slug(_cfg(mixture='beta+gamma')) == 'text_to_text-beta-gamma'


@pytest.mark.parametrize('changes, match', [
    (dict(mixture=''), 'config.data.mixture must name'),
    (dict(mixture='alpha,delta'), "unknown text-to-text task 'delta' in config.data.mixture"),
    (dict(mixture='alpha,alpha'), "config.data.mixture='alpha,alpha' names"),
    (dict(mixing='alpha=1,beta=2'), 'must weigh exactly the tasks of config.data.mixture'),
    (dict(mixing='alpha=1,beta=2,gamma=1,delta=1'), 'must weigh exactly'),
    (dict(mixing='alpha=1,beta=0,gamma=1'), 'every task needs a positive rate'),
    (dict(mixing='uniform'), "neither 'proportional' nor weights"),
    (dict(mixing='alpha=x,beta=1,gamma=1'), "neither 'proportional' nor weights"),
    (dict(mixing_cap=-1), 'config.data.mixing_cap=-1'),
])
def test_errors_name_the_config_field(changes, match):
  with pytest.raises(ValueError, match=match):
    text_to_text.proportions(_cfg(**changes), [60, 20, 10])


def test_a_task_checks_its_metrics_and_baseline():
  with pytest.raises(ValueError, match='metrics'):
    dataclasses.replace(text_to_text.get('alpha'), metrics=('meteor',))
  with pytest.raises(ValueError, match='baseline'):
    dataclasses.replace(text_to_text.get('alpha'), baseline='oracle')


def test_real_tasks_read_their_datasets_with_prefixes(real_data_dir):
  cfg = pipeline.DataConfig(task='text_to_text', mixture='translate,modernize,genre',
                            data_dir=str(real_data_dir))
  prefixes = {'translate': 'translate English to Spanish: ', 'modernize': 'modernize: ',
              'genre': 'genre: '}
  for task in text_to_text.mixture_tasks(cfg):
    record = text_to_text.records(cfg, task, 'test')[0]
    assert record['inputs'] == prefixes[task.name] + record['source']
  genre = text_to_text.examples(cfg, text_to_text.get('genre'), 'validation')
  assert {r['targets'] for r in genre} <= set(text_to_text.tasks_lib.GENRES)
  translate = text_to_text.records(cfg, text_to_text.get('translate'), 'test')
  source = pipeline.data_source(pipeline.DataConfig(name='bible/en_es', task='seq2seq',
                                                    source_key='en', target_key='es',
                                                    data_dir=str(real_data_dir)), 'test')
  assert translate[5]['targets'] == source[5]['es'].decode()
