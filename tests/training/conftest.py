"""Fixtures shared by the training tests: one finished tiny run that many tests read."""

import os

import pytest

from tests.training.test_loop import tiny_config
from training import loop

# What `finished_run` plants in its workdir before training, to check the run cleans it up.
PLANTED_RECORD = '{"step": 0, "split": "planted"}\n'
PLANTED_PARTIAL = '{"step": 1, "split": "half-writ'  # a line a killed run left unfinished
PLANTED_TMP = os.path.join('checkpoints', '3.orbax-checkpoint-tmp-1234567890')


@pytest.fixture(scope='session')
def finished_run(tmp_path_factory):
  """A 5-step run: saves every 2 steps plus the final step, keeping the last 2 ([4, 5]).

  Before it trained, its workdir held a metrics.jsonl whose last line was half-written and
  a save a crash left unfinished (PLANTED_*). Copy the workdir before altering it.
  """
  tmp_path = tmp_path_factory.mktemp('finished')
  config = tiny_config(tmp_path, num_steps=5, checkpoint_every=2, keep_checkpoints=2,
                       eval_every=100, log_every=1)
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, PLANTED_TMP, 'state'))
  with open(os.path.join(workdir, PLANTED_TMP, 'state', 'x'), 'w') as f:
    f.write('half-saved')
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(PLANTED_RECORD + PLANTED_PARTIAL)
  loop.train_and_evaluate(config, workdir)
  return config, workdir
