"""train.py and eval.py as a user runs them: bad input fails early and says what is wrong."""

import os
import subprocess
import sys

import pytest

from tests.training.test_loop import tiny_config
from training import checkpoint
from training import loop


def run(*args, check=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        check=check, timeout=600)


@pytest.mark.parametrize('override, message', [
    ('--config.train.num_stepz=3', 'num_stepz'),
    ('--config.train.num_steps=abc', 'config.train.num_steps'),
])
def test_train_rejects_bad_config_overrides(tmp_path, override, message):
  result = run('train.py', '--config=configs/gpt.py:size=tiny', f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr


def test_train_rejects_an_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run('train.py', '--config=configs/gpt.py:size=tiny', f'--workdir={blocker}/run')
  assert result.returncode != 0
  assert 'is not writable' in result.stderr


def test_a_workdir_of_another_model_names_the_differing_parameters(tmp_path):
  config = tiny_config(tmp_path, num_steps=2)
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir)
  config.unlock()
  config.model.embed_dim = 64
  config.lock()
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
    loop.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'block_0/attention/query/bias: checkpoint (2, 16) vs model (2, 32)' in message
  assert 'parameter(s) differ' in message


def test_eval_without_a_run_says_so(tmp_path):
  result = run('eval.py', f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert 'config.json not found' in result.stderr
