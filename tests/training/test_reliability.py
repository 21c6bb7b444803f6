"""Nothing lost: damaged checkpoints, non-finite steps and preemption."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives
from objectives import causal_lm
from tests.training.test_loop import tiny_config
from training import loop
from training import metrics


def _checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def test_a_damaged_latest_checkpoint_is_reported_and_skipped(tmp_path, capsys):
  config = tiny_config(tmp_path, num_steps=4, checkpoint_every=2)
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir)
  # Truncate every array chunk of the step-4 state: its bytes no longer decode.
  chunks = glob.glob(os.path.join(workdir, 'checkpoints', '4', 'state', '**', 'd', '*'),
                     recursive=True)
  assert chunks
  for path in chunks:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  config.unlock()
  config.train.num_steps = 6
  config.lock()
  loop.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'checkpoints/4 is damaged' in out
  assert 'Resumed from' in out and 'at step 2.' in out
  names = _checkpoints(workdir)
  assert '6' in names and '4' in names  # step 4 was trained again and saved anew
  assert any(n.startswith('4.damaged-') for n in names)


class _Poisoned:
  """causal_lm whose loss is multiplied by the batch's `poison` column (1, or NaN)."""
  summarize = staticmethod(causal_lm.summarize)

  @staticmethod
  def loss_fn(params, batch, rng, *, model, deterministic=False):
    batch = dict(batch)
    poison = batch.pop('poison', jnp.ones(()))  # evaluation batches are clean
    loss, sums = causal_lm.loss_fn(params, batch, rng, model=model, deterministic=deterministic)
    return loss * jnp.mean(poison), sums


def _poison_step(monkeypatch, bad_step):
  """Feeds a NaN into the loss at `bad_step` through the training batches."""
  monkeypatch.setitem(objectives.OBJECTIVES, 'poisoned', _Poisoned)
  original = loop.pipeline.train_iterator

  class Iterator:
    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = dict(next(self.inner))
      self.count += 1
      value = np.nan if self.count == bad_step else 1.0
      batch['poison'] = np.full(batch['inputs'].shape, value, np.float32)
      return batch

    def get_state(self):
      return self.inner.get_state()

  monkeypatch.setattr(loop.pipeline, 'train_iterator',
                      lambda *a, **k: Iterator(original(*a, **k)))


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
  _poison_step(monkeypatch, bad_step=3)
  config = tiny_config(tmp_path, num_steps=6, checkpoint_every=2, eval_every=100)
  config.unlock()
  config.objective = 'poisoned'
  config.lock()
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.NonFiniteError, match=r'step 3: loss is not finite'):
    loop.train_and_evaluate(config, workdir)
  assert _checkpoints(workdir) == ['2']  # the last good checkpoint, nothing after it


def test_skip_mode_skips_and_counts_non_finite_steps(tmp_path, monkeypatch):
  _poison_step(monkeypatch, bad_step=3)
  config = tiny_config(tmp_path, num_steps=6, eval_every=100, on_nonfinite='skip')
  config.unlock()
  config.objective = 'poisoned'
  config.lock()
  workdir = str(tmp_path / 'run')
  report = loop.train_and_evaluate(config, workdir)
  assert np.isfinite(report['loss'])
  train = [m for m in metrics.read_metrics(workdir) if m['split'] == 'train']
  assert train[-1]['step'] == 6 and train[-1]['skipped_steps'] == 1.0
  assert all(np.isfinite(m['loss']) for m in train)


def test_sigterm_saves_the_current_step_and_rerunning_continues(tmp_path):
  config = tiny_config(tmp_path)
  workdir = tmp_path / 'run'
  args = [sys.executable, 'train.py', '--config=configs/gpt.py:size=tiny', f'--workdir={workdir}',
          f'--config.data.files={config.data.files}',
          f'--config.data.data_dir={config.data.data_dir}',
          f'--config.data.vocab_size={config.data.vocab_size}',
          '--config.train.num_steps=100000', '--config.train.checkpoint_every=1000000',
          '--config.train.eval_every=1000000', '--config.train.log_every=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 300
  while not any(m['step'] >= 5 for m in metrics.read_metrics(workdir)):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'Preempted: saved step' in out
  saved = int(out.split('Preempted: saved step ')[1].split(';')[0])
  assert _checkpoints(workdir) == [str(saved)]

  rerun = subprocess.run(args[:-4] + ['--config.train.num_steps=' + str(saved + 2)], env=env,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert f'Resumed from {workdir}/checkpoints at step {saved}.' in rerun.stdout
