"""The sweep runner, the length evaluation, the positions report and the scaling study."""

import json
import math
import os
import statistics

import numpy as np
import pytest

from configs import gpt_positions
from tests.training.test_loop import tiny_config
from studies import length_eval
from studies import positions_report
from studies import scaling_study
from training import metrics
from training import sweep


def _point(tmp_path, position):
  config = tiny_config(tmp_path, num_steps=4, eval_every=4, checkpoint_every=4)
  config.unlock()
  config.model.position = position
  config.lock()
  return sweep.Point(position, config)


@pytest.fixture(scope='module')
def finished_sweep(tmp_path_factory):
  """A 2-point sweep (learned, rope) trained for a few steps: (workdir, results)."""
  tmp_path = tmp_path_factory.mktemp('sweep')
  workdir = str(tmp_path / 'sweep')
  points = [_point(tmp_path, 'learned'), _point(tmp_path, 'rope')]
  return workdir, sweep.run(points, workdir), points


def test_sweep_trains_every_point_and_prints_a_table(finished_sweep):
  workdir, results, _ = finished_sweep
  assert list(results) == ['learned', 'rope']
  for name, result in results.items():
    assert result['steps'] == 4
    assert np.isfinite(result['validation']['perplexity'])
    # The result is the point's own final validation, as its training run logged it.
    logged = [m for m in metrics.read_metrics(os.path.join(workdir, name))
              if m['split'] == 'validation']
    assert logged[-1]['step'] == 4
    assert result['validation'] == {k: v for k, v in logged[-1].items()
                                    if k not in ('step', 'split', 'time')}
    with open(os.path.join(workdir, name, 'result.json')) as f:
      assert json.load(f) == result
    assert os.path.isdir(os.path.join(workdir, name, 'checkpoints', '4'))
  text = sweep.table(results)
  assert '| learned |' in text and '| rope |' in text


def test_a_finished_point_is_skipped(finished_sweep, monkeypatch, capsys):
  workdir, results, points = finished_sweep

  def must_not_train(*args, **kwargs):
    raise AssertionError('a finished point was trained again')

  monkeypatch.setattr(sweep.loop, 'train_and_evaluate', must_not_train)
  again = sweep.run(points, workdir)
  assert again == results
  assert capsys.readouterr().out.count('finished, skipped') == 2


def test_a_point_without_result_is_run(tmp_path, monkeypatch):
  calls = []
  point = _point(tmp_path, 'none')

  def fake_train(config, point_dir):
    calls.append(point_dir)
    return {'loss': 1.0, 'perplexity': math.e, 'accuracy': 0.5}

  monkeypatch.setattr(sweep.loop, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(sweep, 'final_step', lambda point_dir: 4)
  result = sweep.run([point], str(tmp_path / 'w'))['none']
  assert calls == [str(tmp_path / 'w' / 'none')]
  assert result['validation']['perplexity'] == pytest.approx(math.e)


def test_a_preempted_point_is_not_marked_finished(tmp_path, monkeypatch):
  point = _point(tmp_path, 'none')
  monkeypatch.setattr(sweep.loop, 'train_and_evaluate', lambda config, point_dir: {})
  monkeypatch.setattr(sweep, 'final_step', lambda point_dir: 2)
  with pytest.raises(RuntimeError, match='stopped at step 2 of 4'):
    sweep.run([point], str(tmp_path / 'w'))
  assert sweep.read_result(str(tmp_path / 'w'), 'none') is None


def test_length_eval_reports_na_for_learned_and_numbers_for_rope(finished_sweep):
  workdir, results, _ = finished_sweep
  learned = length_eval.evaluate_run(os.path.join(workdir, 'learned'), factors=(1, 2))
  rope = length_eval.evaluate_run(os.path.join(workdir, 'rope'), factors=(1, 2))
  assert learned['fixed_positions'] and not rope['fixed_positions']
  assert learned['lengths'][64] is None  # tiny config: L = 32
  assert np.isfinite(rope['lengths'][64]['perplexity'])
  # At L both reproduce the run's own final validation.
  for name, entry in (('learned', learned), ('rope', rope)):
    assert entry['lengths'][32]['perplexity'] == pytest.approx(
        results[name]['validation']['perplexity'], rel=1e-5)
  assert rope['params_added'] == 0 and learned['params_added'] == 32 * 32


def test_positions_report_writes_the_doc_and_plot(finished_sweep, tmp_path):
  workdir, _, _ = finished_sweep
  length_eval.main(['--workdir', workdir, '--factors', '1,2'])
  out = str(tmp_path / 'positions.md')
  positions_report.write(workdir, out, 'make positions')
  text = open(out).read()
  assert 'n/a (no embedding beyond L)' in text
  assert '| rope | 1 | no | 0 |' in text  # one seed: no spread
  assert 'trained with one seed, so no spread is shown' in text
  assert open(tmp_path / 'positions.png', 'rb').read()[:4] == b'\x89PNG'


def test_the_positions_sweep_differs_only_in_the_scheme_and_seed():
  points = sweep.points('configs/gpt_positions.py')
  assert [p.name for p in points] == [f'{scheme}-s{seed}' for seed in gpt_positions.SEEDS
                                      for scheme in gpt_positions.SCHEMES]
  assert len(gpt_positions.SEEDS) >= 3
  dicts = [p.config.to_dict() for p in points]
  for d, p in zip(dicts, points):
    scheme, seed = p.name.rsplit('-s', 1)
    assert d['model'].pop('position') == scheme
    # The seed sets both the initialisation and the order of the training data.
    assert d.pop('seed') == d['data'].pop('seed') == int(seed)
  assert all(d == dicts[0] for d in dicts)
  assert points[0].config.model.max_len == points[0].config.data.seq_len


def test_the_positions_sweep_takes_a_number_of_seeds_and_passes_the_rest_on():
  points = sweep.points('configs/gpt_positions.py:seeds=2,steps=10')
  assert [p.name for p in points][:2] == ['none-s0', 'learned-s0']
  assert len(points) == 2 * len(gpt_positions.SCHEMES)
  assert {p.config.seed for p in points} == {0, 1}
  assert {p.config.train.num_steps for p in points} == {10}
  with pytest.raises(ValueError, match='seeds=N'):
    gpt_positions.sweep('seed=3')
  with pytest.raises(ValueError, match='at least one seed'):
    gpt_positions.sweep('seeds=0')


def test_a_positions_config_without_seed_is_seed_0():
  config = gpt_positions.get_config('position=alibi')
  assert config.seed == config.data.seed == 0 and config.model.position == 'alibi'
  config = gpt_positions.get_config('position=alibi,seed=4')
  assert config.seed == config.data.seed == 4


@pytest.mark.parametrize('name', gpt_positions.SCHEMES)
def test_only_learned_fixes_the_set_of_positions(name):
  model = gpt_positions.get_config(f'position={name}').model.to_dict()
  assert length_eval.fixed_positions(model) == (name == 'learned')


# Synthetic runs for the report: {scheme: [(ppl at L, ppl(4L) / ppl(L)) per seed]}. At 2L
# the perplexity has made a third of its change. The ratios put each scheme in one case of
# the verdict rule.
SYNTHETIC = {
    'none': [(40.0, 1.000), (42.0, 1.005), (44.0, 1.010)],     # band within 1.02: no
    'learned': [(50.0, None), (52.0, None), (54.0, None)],     # no embedding beyond L
    'sinusoidal': [(90.0, 1.2), (95.0, 1.3), (100.0, 1.1)],   # over 1.5 x none: did not train
    't5': [(36.0, 1.06), (37.0, 1.10), (38.0, 1.14)],          # band crosses 1.10
    'rope': [(30.0, 1.05), (31.0, 1.06), (32.0, 1.07)],        # band within (1.02, 1.10]
    'alibi': [(33.0, 1.00), (34.0, 1.03), (35.0, 1.06)],       # band crosses 1.02
}


def _write_synthetic_sweep(workdir, runs=SYNTHETIC, train_len=64):
  """result.json per point and length_eval.json, as the sweep and length_eval write them."""
  evals = {}
  for scheme, per_seed in runs.items():
    for seed, (ppl, ratio) in enumerate(per_seed):
      name = f'{scheme}-s{seed}'
      config = gpt_positions.get_config(f'position={scheme},seed={seed}').to_dict()
      os.makedirs(os.path.join(workdir, name))
      with open(os.path.join(workdir, name, sweep.RESULT), 'w') as f:
        json.dump({'name': name, 'steps': 500, 'train_seconds': 10.0 + seed,
                   'validation': {'perplexity': ppl}, 'config': config}, f)
      reports = [None if ratio is None and factor > 1 else
                 {'perplexity': ppl * (1 + (factor - 1) / 3 * ((ratio or 1) - 1)),
                  'loss': 0.0, 'accuracy': 0.0, 'tokens': 32000.0, 'seconds': 1.0}
                 for factor in (1, 2, 4)]
      evals[name] = {'position': scheme, 'fixed_positions': ratio is None,
                     'params_added': 4096 if ratio is None else 0, 'train_len': train_len,
                     'step': 500, 'lengths': {str(train_len * f): r
                                              for f, r in zip((1, 2, 4), reports)}}
  with open(os.path.join(workdir, length_eval.OUTPUT), 'w') as f:
    json.dump(evals, f, sort_keys=True)  # by name, as checkpoint.write_json has them


def _pm(values, digits, scale=1.0, sign='', unit=''):
  """'mean ± sample std' computed here independently of the report."""
  return (f'{statistics.mean(values) * scale:{sign}.{digits}f}{unit} ± '
          f'{statistics.stdev(values) * scale:.{digits}f}{unit}')


def _row(text, scheme):
  return next(line for line in text.splitlines() if line.startswith(f'| {scheme} |'))


def test_positions_report_aggregates_seeds_with_mean_and_sample_std(tmp_path):
  workdir, out = str(tmp_path / 'w'), str(tmp_path / 'positions.md')
  _write_synthetic_sweep(workdir)
  positions_report.write(workdir, out, 'make positions')
  text = open(out).read()
  none = [p for p, _ in SYNTHETIC['none']]
  for scheme in ('none', 'rope', 'alibi', 't5'):
    row = _row(text, scheme).split(' | ')
    ppl = [p for p, _ in SYNTHETIC[scheme]]
    ratios = [r for _, r in SYNTHETIC[scheme]]
    assert row[1:4] == ['3', 'no', '0']  # seeds, fixed set of positions, params added
    assert row[4] == _pm(ppl, 2)  # at L
    assert row[5] == _pm([p * (1 + (r - 1) / 3) for p, r in SYNTHETIC[scheme]], 2)  # 2L
    assert row[6] == _pm([p * r for p, r in SYNTHETIC[scheme]], 2)  # 4L
    assert row[7] == _pm([p / b for p, b in zip(ppl, none)], 2)  # L vs none, paired by seed
    assert row[8] == _pm(ratios, 3)  # 4L / L, per seed then aggregated
    change = _pm([r - 1 for r in ratios], 1, scale=100, sign='+', unit='%')
    assert f'perplexity at 4L is {change} vs L' in row[9]
  assert _row(text, 'none').split(' | ')[9].startswith('no: ')
  assert _row(text, 'rope').split(' | ')[9].startswith('mildly: ')
  assert _row(text, 'rope').endswith('| does not | partly |')
  assert _row(text, 'alibi').split(' | ')[9].startswith('within noise, no or mildly: ')
  assert _row(text, 'alibi').endswith('| does not | yes |')
  assert _row(text, 't5').split(' | ')[9].startswith('within noise, mildly or yes: ')
  assert _row(text, 't5').endswith('| does not |  |')  # undecided
  learned = _row(text, 'learned')
  assert '| 52.00 ± 2.00 | n/a (no embedding beyond L) | n/a (no embedding beyond L) |' in learned
  assert 'yes: it cannot run past L at all' in learned and learned.endswith('| hinders | yes |')
  sinusoidal = _row(text, 'sinusoidal')
  assert 'inconclusive: it did not train at L' in sinusoidal
  assert '**sinusoidal** did not train at L: perplexity 95.0 ± 5.0' in text
  # Schemes in the order of CONSTRUCTION, whatever the order of the JSON.
  order = [line.split(' | ')[0][2:] for line in text.splitlines() if line.startswith('| ')][1:]
  assert order == [s for s in positions_report.CONSTRUCTION if s in SYNTHETIC]
  assert 'trained with 3 seeds (of 0, 1, 2)' in text and 'sample standard deviation' in text
  assert 'seeds 0, 1, 2 (`seed` and `data.seed`' in text
  assert 'rope 33s' in text  # training wall time summed over the seeds: 10 + 11 + 12
  assert 'rope, alibi' not in text  # alibi agrees within noise
  assert 'from the usual claim: rope.' in text
  assert open(tmp_path / 'positions.png', 'rb').read()[:4] == b'\x89PNG'


def test_positions_report_with_one_seed_shows_no_spread(tmp_path):
  workdir, out = str(tmp_path / 'w'), str(tmp_path / 'positions.md')
  _write_synthetic_sweep(workdir, {s: runs[:1] for s, runs in SYNTHETIC.items()})
  positions_report.write(workdir, out, 'make positions')
  text = open(out).read()
  assert _row(text, 'alibi').startswith(
      f'| alibi | 1 | no | 0 | 33.00 | 33.00 | 33.00 | {33 / 40:.2f} | 1.000 | '
      'no: perplexity at 4L is +0.0% vs L |')
  assert not [line for line in text.splitlines() if line.startswith('| ') and '±' in line]
  assert 'trained with one seed, so no spread is shown' in text


def test_positions_report_refuses_two_runs_of_a_scheme_with_one_seed(tmp_path):
  workdir = str(tmp_path / 'w')
  _write_synthetic_sweep(workdir, {'none': SYNTHETIC['none'][:1], 'rope': SYNTHETIC['rope']})
  evals = json.load(open(os.path.join(workdir, length_eval.OUTPUT)))
  results = {n: sweep.read_result(workdir, n) for n in evals}
  results['rope'], evals['rope'] = results['rope-s0'], evals['rope-s0']  # an older point
  with pytest.raises(ValueError, match='rope-s0 and rope are both rope with seed 0'):
    positions_report.group(evals, results)
  del results['rope'], evals['rope']
  results['rope-s1']['config']['train']['num_steps'] = 10
  with pytest.raises(ValueError, match='differ in more than the scheme and seed'):
    positions_report.group(evals, results)


@pytest.mark.parametrize('ratios, answer, hinders', [
    ((1.00, 1.01), 'no', False),
    ((1.05, 1.07), 'mildly', False),
    ((1.12, 1.14), 'yes', True),
    ((1.01, 1.04), 'within noise, no or mildly', False),
    ((1.08, 1.12), 'within noise, mildly or yes', None),
    ((1.00, 1.20), 'within noise, no or yes', None),
    ((1.019,), 'no', False),  # one seed: the mean alone decides
])
def test_the_verdict_holds_only_beyond_the_spread(ratios, answer, hinders):
  runs = [positions_report.Run(f'x-s{i}', i, {'lengths': {'64': {'perplexity': 10.0},
                                                          '256': {'perplexity': 10.0 * r}}},
                               {}) for i, r in enumerate(ratios)]
  text, got = positions_report.verdict(runs)
  assert text.startswith(answer + ':') and got is hinders


def test_unscaled_attention_saturates_with_d_k_and_scaled_does_not():
  records = scaling_study.measure(scaling_study.Setup(head_dims=(16, 256), batch=2, length=32))
  by = {(r['score'], r['head_dim']): r for r in records}
  assert by['dot', 256]['max_prob'] > by['dot', 16]['max_prob'] + 0.2
  assert by['dot', 256]['grad_logits'] < 0.7 * by['dot', 16]['grad_logits']
  assert by['scaled_dot', 256]['max_prob'] == pytest.approx(by['scaled_dot', 16]['max_prob'],
                                                            abs=0.05)
  assert by['scaled_dot', 256]['entropy_frac'] == pytest.approx(
      by['scaled_dot', 16]['entropy_frac'], abs=0.05)
