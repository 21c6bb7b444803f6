"""Feature extraction (studies/features.py) and the frozen-feature probe (feature_probe.py).

One tiny BERT workdir, written the way training writes it (config.json + an Orbax save),
with parameters moved off their initialisation so that features must come from the
checkpoint; features are compared with the model run directly on the same batches.
"""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

from configs import bert
from data import encoder_data
from data import tasks
from studies import feature_probe
from studies import features
from tests.tolerances import assert_close
from training import checkpoint
from training import loop

STEP = 3
LAYERS = '-1,-2,-3..-1'  # tiny BERT: embeddings + 2 layers = 3 hidden states
MAX_EXAMPLES = 20        # 2.5 batches of 8: the last batch is cut


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, experiment, params) of a tiny BERT checkpoint at step STEP."""
  workdir = str(tmp_path_factory.mktemp('bert_features'))
  config = bert.get_config('size=tiny')
  exp = loop.build(config)
  # Random parameters on the host (no jitted init: this is a test of reading them back),
  # far from any initialisation, so features can only come from the checkpoint.
  abstract, shardings = exp.abstract_state()
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(s.dtype),
                        abstract.params)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract).replace(params=params)
  state = jax.device_put(state, shardings)
  checkpoint.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False, writer=True)
  checkpoint.save(mngr, STEP, state, None, config.to_dict())
  mngr.wait_until_finished()
  return workdir, exp, params


@pytest.fixture(scope='module')
def written(run):
  """The CLI's output: cls-pooled paraphrase features of the first MAX_EXAMPLES per split."""
  workdir, _, _ = run
  features.main([f'--workdir={workdir}', '--task=paraphrase', f'--layers={LAYERS}',
                 '--pooling=cls', '--splits=train,validation,test',
                 f'--max_examples={MAX_EXAMPLES}', '--no_progress'])
  return os.path.join(workdir, 'features', 'paraphrase', f'step_{STEP}')


def _direct(exp, params, task, split, batches_needed):
  """The model's hidden states run directly on the task's first batches (no features code)."""
  data = dataclasses.replace(exp.data, task=tasks.get_task(task).name)
  batches = list(encoder_data.task_eval_batches(task, data, exp.tokenizer, split,
                                                max_batches=batches_needed))
  states, hidden, segments, weights = [], [], [], []
  for b in batches:
    out = _apply(exp.model, params, b['inputs'], b['token_types'], b['segment_ids'],
                 b['positions'])
    states.append(np.stack(out['hidden_states']))  # [S, B, T, D]
    hidden.append(out['hidden'])
    segments.append(b['segment_ids'])
    weights.append(b['example_weight'])
  return (np.concatenate(states, axis=1), np.concatenate(hidden), np.concatenate(segments),
          np.concatenate(weights), batches)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, token_types, segment_ids, positions):
  return model.apply({'params': params}, tokens, token_types_BT=token_types,
                     segment_ids_BT=segment_ids, positions_BT=positions, hidden_states=True)


def test_parse_layers():
  specs = features.parse_layers('-1,-2,-4..-1,0', num_states=5)
  assert [s.indices for s in specs] == [(4,), (3,), (1, 2, 3, 4), (0,)]
  assert [s.key for s in specs] == ['layers[-1]', 'layers[-2]', 'layers[-4..-1]', 'layers[0]']
  assert features.parse_layers('1..2', 3)[0].indices == (1, 2)
  for bad, match in [('-6', 'out of range'), ('5', 'out of range'), ('-1..-3', 'backwards'),
                     ('x', 'not an integer'), ('-1,-1', 'repeat'), ('', 'no layer')]:
    with pytest.raises(ValueError, match=match):
      features.parse_layers(bad, 5)


def test_files_shapes_and_metadata(run, written):
  workdir, exp, _ = run
  dim = exp.model.config.embed_dim
  for split in ('train', 'validation', 'test'):
    arrays, meta = features.load_npz(os.path.join(written, f'{split}.npz'))
    assert arrays['layers[-1]'].shape == (MAX_EXAMPLES, dim)
    assert arrays['layers[-2]'].shape == (MAX_EXAMPLES, dim)
    assert arrays['layers[-3..-1]'].shape == (MAX_EXAMPLES, 3 * dim)
    assert arrays['layers[-1]'].dtype == np.float32
    assert arrays['label'].shape == (MAX_EXAMPLES,)
    np.testing.assert_array_equal(arrays['index'], np.arange(MAX_EXAMPLES))
    assert meta['task'] == 'paraphrase' and meta['step'] == STEP and meta['split'] == split
    assert meta['workdir'] == os.path.abspath(workdir) and meta['pooling'] == 'cls'
    assert meta['layers'] == {'layers[-1]': [2], 'layers[-2]': [1], 'layers[-3..-1]': [0, 1, 2]}
    assert meta['num_examples'] == MAX_EXAMPLES and not meta['complete']
    assert 'mask' not in arrays  # per-token arrays only with --pooling=tokens
  assert not [f for f in os.listdir(written) if '.tmp-' in f]  # atomic writes leave no temps


def test_cls_features_are_the_models_states_at_position_zero(run, written):
  _, exp, params = run
  arrays, _ = features.load_npz(os.path.join(written, 'validation.npz'))
  states, hidden, _, _, batches = _direct(exp, params, 'paraphrase', 'validation', 3)
  assert_close(arrays['layers[-1]'], hidden[:MAX_EXAMPLES, 0])
  assert_close(arrays['layers[-2]'], states[-2, :MAX_EXAMPLES, 0])
  # The range is the layers concatenated in order along the feature axis.
  expected = np.concatenate([states[i, :MAX_EXAMPLES, 0] for i in range(3)], axis=-1)
  assert_close(arrays['layers[-3..-1]'], expected)
  labels = np.concatenate([b['label'] for b in batches])[:MAX_EXAMPLES]
  np.testing.assert_array_equal(arrays['label'], labels)


def _toy_task():
  """Eleven examples: a last batch of 8 with 5 weight-0 rows padding it."""
  words = 'in the beginning god created the heaven and the earth and darkness'.split()
  examples = {split: [{'sentence': ' '.join(words[:i + 1 + k]), 'label': (i + k) % 2}
                      for i in range(11)] for k, split in enumerate(('train', 'validation'))}
  return tasks.ClassificationTask('toy', ('sentence',), 2,
                                  lambda data_dir, split, seed: examples[split])


@pytest.mark.parametrize('pooling', ['mean', 'tokens'])
def test_padding_rows_are_dropped_and_pooling_reads_real_tokens(run, tmp_path, pooling):
  _, exp, params = run
  task = _toy_task()
  paths = features.extract_task(exp, params, task, ['train'], '-1', pooling, str(tmp_path),
                                progress=False)
  arrays, meta = features.load_npz(paths['train'])
  assert meta['num_examples'] == meta['split_examples'] == 11 and meta['complete']
  np.testing.assert_array_equal(arrays['label'], [i % 2 for i in range(11)])
  states, _, segments, weights, _ = _direct(exp, params, task, 'train', 0)
  assert len(weights) == 16 and weights.sum() == 11  # the split really had padding rows
  last, segments = states[-1, :11], segments[:11]
  if pooling == 'tokens':
    assert arrays['layers[-1]'].shape == last.shape
    np.testing.assert_array_equal(arrays['mask'], segments != 0)
    real = segments[..., None] != 0
    assert_close(np.where(real, arrays['layers[-1]'], 0), np.where(real, last, 0))
  else:
    # The mean over real tokens, computed here by hand from the direct states.
    expected = np.stack([last[b, segments[b] != 0].mean(axis=0) for b in range(11)])
    assert_close(arrays['layers[-1]'], expected)


def test_probe_writes_the_table_and_json(run, written, tmp_path, capsys):
  out = str(tmp_path / 'probe.md')
  feature_probe.main([f'--features={written}', f'--out={out}', '--c_grid=0.1,1'])
  table = open(out).read()
  for key in ('layers[-1]', 'layers[-2]', 'layers[-3..-1]', 'majority baseline', 'MCC',
              'paraphrase', f'step {STEP}'):
    assert key in table, key
  assert len([line for line in table.splitlines() if line.startswith('| ')]) == 5  # head + 4
  with open(str(tmp_path / 'probe.json')) as f:
    report = json.load(f)
  assert report['examples'] == {'train': MAX_EXAMPLES, 'validation': MAX_EXAMPLES,
                                'test': MAX_EXAMPLES}
  for entry in report['probes'].values():
    assert entry['C'] in (0.1, 1.0)
    for split in ('validation', 'test'):
      assert 0.0 <= entry[split]['accuracy'] <= 1.0 and -1.0 <= entry[split]['mcc'] <= 1.0
  # A subset: the baseline is the training majority scored on the labels read.
  arrays = {s: features.load_npz(os.path.join(written, f'{s}.npz'))[0]['label']
            for s in ('train', 'validation')}
  majority = np.bincount(arrays['train']).argmax()
  assert report['baseline']['validation']['accuracy'] == pytest.approx(
      np.mean(arrays['validation'] == majority))
  assert report['baseline']['validation']['mcc'] == 0.0
  assert 'wrote' in capsys.readouterr().out


def test_probe_scores_by_hand():
  labels = np.array([1, 1, 0, 0, 1])
  predictions = np.array([1, 0, 0, 1, 1])
  # tp 2, fp 1, fn 1, tn 1: precision = recall = 2/3; MCC = (2·1 - 1·1) / sqrt(3·3·2·2).
  s = feature_probe.scores(labels, predictions, 2)
  assert s['accuracy'] == pytest.approx(3 / 5) and s['f1'] == pytest.approx(2 / 3)
  assert s['mcc'] == pytest.approx(1 / 6)
  three = feature_probe.scores(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), 3)
  assert three['f1'] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # macro over classes


def test_probe_baseline_on_whole_splits_is_the_tasks(monkeypatch):
  calls = []

  def fake(task, split, data_dir=None):
    calls.append((task, split, data_dir))
    return {'majority': 1, 'accuracy': 0.25, 'f1': 0.4}

  monkeypatch.setattr(tasks, 'baseline', fake)
  labels = {'train': np.array([1, 1, 0]), 'validation': np.array([0, 0, 0, 1])}
  whole = feature_probe.baseline('paraphrase', labels, 2, complete=True, data_dir='D')
  assert calls == [('paraphrase', 'validation', 'D')]
  assert whole['validation']['accuracy'] == 0.25 and whole['validation']['f1'] == 0.4
  subset = feature_probe.baseline('paraphrase', labels, 2, complete=False)
  assert subset['validation']['accuracy'] == 0.25 and subset['validation']['f1'] == pytest.approx(0.4)


def test_probe_baseline_skips_hidden_labels():
  labels = {'train': np.array([1, 1, 0]), 'validation': np.array([0, 1]),
            'test': np.array([-1, -1])}  # GLUE's test split: labels withheld
  result = feature_probe.baseline('glue/sst2', labels, 2, complete=False)
  assert set(result) == {'validation'}
