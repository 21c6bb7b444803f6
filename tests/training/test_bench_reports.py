"""The speed benchmarks' code paths that a full run takes minutes to reach: arguments, the
rounds' bookkeeping, results, pages (bench/common.py, bench/seq2seq_speed.py,
bench/t5_speed.py); and T5's two sides at tiny shapes, in process, computing the same first
loss from the same weights. No worker processes and nothing timed.
"""

import json
import types

import numpy as np
import pytest

from bench import common
from bench import seq2seq_speed
from bench import t5_speed
from tests import tolerances

ENV = {'ours': {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=1'}, 'peer': {'GLIBC_TUNABLES': None}}
# Seconds per call and matmul GFLOP/s of each side: sdpa the faster peer at training, eager
# at decoding; the best matmul is eager's.
TRAIN_S = {'ours': [1.0, 3.0, 2.0], 'sdpa': [3.0, 4.0, 5.0], 'eager': [6.0, 6.0, 6.0]}
DECODE_S = {'ours': [0.5], 'sdpa': [2.0], 'eager': [1.0]}
MATMUL = {'ours': [90.0, 100.0], 'sdpa': [80.0], 'eager': [120.0]}


def _samples(whats=('train', 'decode')):
  times = {'train': TRAIN_S, 'decode': DECODE_S}
  samples = {(n, 'matmul'): v for n, v in MATMUL.items()}
  samples.update({(n, w): times[w][n] for n in MATMUL for w in whats})
  return samples


def _info(params=1234):
  return {n: {'framework': f'{n} framework', 'params': params} for n in MATMUL}


def _check_page(page, result, headline):
  """The page ends with the headline and the result as JSON, and names every side."""
  assert '```\n' + '\n'.join(headline) + '\n```' in page
  assert json.loads(page.split('```json\n')[1].split('\n```')[0]) == json.loads(
      json.dumps(result))
  for name in MATMUL:
    assert f'{name} framework' in page
  assert 'GLIBC_TUNABLES: ours glibc.malloc.arena_max=1; peer unset.' in page


def test_seq2seq_result_and_page():
  shape = seq2seq_speed.Shape()
  result = seq2seq_speed.summarize(
      shape, _samples(), _info(), {n: 4.5 for n in MATMUL},
      {'ours': np.array([[1, 2], [3, 4]]), 'sdpa': np.array([[1, 2], [3, 5]]),
       'eager': np.array([[1, 2], [3, 4]])},
      peers=('sdpa', 'eager'), env=ENV, rounds=3, steps=1, decodes=1)
  assert result['train_peer'] == 'sdpa' and result['decode_peer'] == 'eager'
  assert result['train_ratio'] == pytest.approx(4.0 / 2.0)  # medians
  assert result['decode_ratio'] == pytest.approx(1.0 / 0.5)
  assert result['same_best_hypotheses'] == {'sdpa': 0.5, 'eager': 1.0}
  assert result['train_mfu']['ours'] == pytest.approx(
      shape.train_flops_per_step() / 2.0 / 1e9 / 120.0)
  page = seq2seq_speed.report(result, 'python -m bench.seq2seq_speed', 'a note')
  headline = seq2seq_speed.headline(result)
  assert headline == ['train tokens/s ours/peer = 2.00', 'beam decode tokens/s ours/peer = 2.00',
                      f'CPU MFU = {100 * result["train_mfu"]["ours"]:.1f}%']
  _check_page(page, result, headline)
  assert page.startswith('# Seq2seq speed: contextual vs Hugging Face transformers (PyTorch)'
                         '\n\nCommand: `python -m bench.seq2seq_speed`\n\n')
  assert '| train target tokens/s | 1024 | 512 | 341 | 2.00 |' in page


def test_t5_result_and_page():
  shape = t5_speed.Shape()
  result = t5_speed.summarize(shape, _samples(('train',)), _info(), {n: 9.0 for n in MATMUL},
                              peers=('sdpa', 'eager'), env=ENV, rounds=3, steps=1)
  assert result['train_peer'] == 'sdpa'
  assert result['train_ratio'] == pytest.approx(2.0)
  assert result['train_tokens_per_s']['ours'] == pytest.approx(32 * 16 / 2.0)
  assert result['train_mfu']['ours'] == pytest.approx(
      shape.train_flops_per_step() / 2.0 / 1e9 / 120.0)
  page = t5_speed.report(result, 'python -m bench.t5_speed', '')
  headline = t5_speed.headline(result)
  assert headline == ['train tokens/s ours/peer = 2.00',
                      f'CPU MFU = {100 * result["train_mfu"]["ours"]:.1f}%']
  _check_page(page, result, headline)
  assert '| train target tokens/s | 256 | 128 | 85 | 2.00 |' in page


def test_t5_flops_count_each_matmul():
  """Model FLOPs of a 1 + 1 layer T5 of width 2, MLP 3, vocabulary 5, one 1-token pair,
  counted by hand: encoder 4·2² + 3·2·3 = 34 matmul parameters, decoder 6·2² + 18 + the
  output's 10 = 52, cross k, v 8 on the input token; 3 (query, key) pairs of 12·2 each."""
  shape = t5_speed.Shape(layers=1, width=2, heads=1, mlp=3, vocab=5, batch=1, source=1,
                         target=1)
  assert shape.train_flops_per_step() == 6 * (34 + 8 + 52) + 12 * 2 * 3


def test_measure_rounds_rotates_and_prints_medians(capsys):
  calls = []

  def side(name):
    def call(method, argument):
      calls.append((name, method, argument))
      if method == 'matmul':
        return MATMUL[name][0]
      return {'train': TRAIN_S, 'decode': DECODE_S}[method][name][:argument]
    return call

  sides = {n: side(n) for n in ('ours', 'sdpa', 'eager')}
  samples = common.measure_rounds(sides, 2, 7, {'train': (2, 'train s/step'),
                                                'decode': (1, 'decode s')})
  assert [c[0] for c in calls if c[1] == 'matmul'] == ['ours', 'sdpa', 'eager',
                                                       'sdpa', 'eager', 'ours']
  assert calls[:3] == [('ours', 'matmul', 7), ('ours', 'train', 2), ('ours', 'decode', 1)]
  assert samples['ours', 'train'] == [1.0, 3.0, 1.0, 3.0]
  assert samples['eager', 'matmul'] == [120.0, 120.0]
  assert capsys.readouterr().out.splitlines()[0] == (
      'round 1/2: train s/step, decode s ours 2.000, 0.500, sdpa 3.500, 2.000, '
      'eager 6.000, 1.000')


def test_checks_refuse_different_sides():
  common.check_same_params(_info())
  with pytest.raises(RuntimeError, match='models differ'):
    common.check_same_params({**_info(), 'eager': {'framework': '', 'params': 1}})
  common.check_first_losses({'ours': 4.0, 'sdpa': 4.0005})
  with pytest.raises(RuntimeError, match='different first losses'):
    common.check_first_losses({'ours': 4.0, 'sdpa': 4.01})


@pytest.mark.parametrize('module, name', [(seq2seq_speed, 'seq2seq_speed'),
                                          (t5_speed, 't5_speed')])
def test_arguments_and_written_page(module, name, tmp_path, capsys):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  per_round = [('decodes', 3, 'beam searches')] if module is seq2seq_speed else []
  common.add_run_arguments(parser, module.Shape, name, peers=module.PEERS,
                           per_round=per_round)
  args = parser.parse_args(['--width=64', '--peers=eager', f'--out={tmp_path}/page.md'])
  assert common.shape_from_args(args, module.Shape) == module.Shape(width=64)
  assert common.peers_from_args(parser, args, module.PEERS) == ('eager',)
  assert (args.rounds, args.steps, args.matmul_repeats, args.peer_tunables) == (
      5, 3, 5, 'default')
  assert parser.parse_args([]).out == f'{common.DOCS}/{name}.md'
  with pytest.raises(SystemExit):
    common.peers_from_args(parser, parser.parse_args(['--peers=flash']), module.PEERS)
  capsys.readouterr()
  report = lambda result, command, note: f'{command}|{note}|{result}'
  common.write_page(name, ['--width=64'], types.SimpleNamespace(out=args.out, note='n'),
                    {'x': 1}, report, lambda result: ['head', 'line'])
  assert (tmp_path / 'page.md').read_text() == f"python -m bench.{name} --width=64|n|{{'x': 1}}"
  assert capsys.readouterr().out == f'head\nline\nwrote {args.out}\n'


@pytest.fixture(scope='module')
def tiny_t5():
  """(shape, HF config, state dict) of a tiny T5 v1.1, as the driver hands them out."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  shape = t5_speed.Shape(layers=1, width=16, heads=2, mlp=32, vocab=64, batch=2, source=6,
                         target=3)
  config = t5_speed.hf_config(shape)
  return shape, config, t5_speed.t5_state(config)


def _peer_first_losses(tiny_t5, params):
  """Each peer, built as its worker builds it, after one train step: its first loss (and
  the same parameter count as ours)."""
  shape, config, state = tiny_t5
  losses = {}
  for attention in t5_speed.PEERS:
    peer = t5_speed.Peer((shape, config, state, attention))
    peer.train(1)
    assert peer.describe(None)['params'] == params
    assert f'attention {attention}' in peer.describe(None)['framework']
    losses[attention] = peer.first_loss
  return losses


def test_t5_sides_compute_the_same_first_loss(tiny_t5):
  """Ours, built as its worker builds it (the weights through hf.t5, the batch, the
  objective), computes each peer's first loss: its train step's forward, jitted alone (the
  whole step compiles for much longer: the slow test below runs it)."""
  import jax  # pylint: disable=g-import-not-at-top
  import objectives
  shape, _, state = tiny_t5
  assert not np.array_equal(state['lm_head.weight'], state['shared.weight'])  # untied
  ours = t5_speed.Ours((shape, state))
  loss_fn = objectives.build('seq2seq', {'label_smoothing': 0.0}).loss_fn
  loss, _ = jax.jit(lambda params, batch: loss_fn(
      params, batch, jax.random.key(0), model=ours.model, deterministic=True))(
          ours.state.params, ours.batch)
  for peer_loss in _peer_first_losses(tiny_t5, ours.describe(None)['params']).values():
    tolerances.assert_close(float(loss), peer_loss)


@pytest.mark.slow
def test_t5_train_steps_compute_the_same_first_loss(tiny_t5):
  """As above, through our side's real (jitted, donating) train step, twice."""
  shape, _, state = tiny_t5
  ours = t5_speed.Ours((shape, state))
  ours.train(2)
  for peer_loss in _peer_first_losses(tiny_t5, ours.describe(None)['params']).values():
    tolerances.assert_close(ours.first_loss, peer_loss)
