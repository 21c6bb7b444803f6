"""The sweep runner, the length evaluation, the positions report and the scaling study."""

import math
import os

import numpy as np
import pytest

from configs import gpt_positions
from tests.training.test_loop import tiny_config
from training import length_eval
from training import positions_report
from training import scaling_study
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
    assert sweep.read_result(workdir, name) == result
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
  assert '| rope | no | 0 |' in text
  assert open(tmp_path / 'positions.png', 'rb').read()[:4] == b'\x89PNG'


def test_the_positions_sweep_differs_only_in_the_scheme():
  points = sweep.points('configs/gpt_positions.py')
  assert [p.name for p in points] == list(gpt_positions.SCHEMES)
  dicts = [p.config.to_dict() for p in points]
  for d, p in zip(dicts, points):
    assert d['model'].pop('position') == p.name
  assert all(d == dicts[0] for d in dicts)
  assert points[0].config.model.max_len == points[0].config.data.seq_len


@pytest.mark.parametrize('name', gpt_positions.SCHEMES)
def test_only_learned_fixes_the_set_of_positions(name):
  model = gpt_positions.get_config(f'position={name}').model.to_dict()
  assert length_eval.fixed_positions(model) == (name == 'learned')


def test_unscaled_attention_saturates_with_d_k_and_scaled_does_not():
  records = scaling_study.measure(scaling_study.Setup(head_dims=(16, 256), batch=2, length=32))
  by = {(r['score'], r['head_dim']): r for r in records}
  assert by['dot', 256]['max_prob'] > by['dot', 16]['max_prob'] + 0.2
  assert by['dot', 256]['grad_logits'] < 0.7 * by['dot', 16]['grad_logits']
  assert by['scaled_dot', 256]['max_prob'] == pytest.approx(by['scaled_dot', 16]['max_prob'],
                                                            abs=0.05)
  assert by['scaled_dot', 256]['entropy_frac'] == pytest.approx(
      by['scaled_dot', 16]['entropy_frac'], abs=0.05)
