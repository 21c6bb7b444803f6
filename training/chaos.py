"""Chaos run: SIGKILL a training run at random moments, resume it, and compare bitwise.

  python -m training.chaos --workdir=workdirs/chaos [--kills=5] [--num_steps=120] [--seed=0]

Trains the tiny GPT on a small synthetic corpus, killing train.py with SIGKILL at `--kills`
seeded moments (half of them right after a checkpoint's `.orbax-checkpoint-tmp` directory
appears, i.e. during a write) and re-running the same command each time. Then trains the
same config without interruption and compares: every leaf of the final parameters and
optimizer state with np.array_equal, and the logged per-step train metrics as exact floats
(the chaos run logs some steps twice; the record written last counts). Prints
`runs killed: N, resumed: N, bitwise identical: yes|no` and exits 1 on 'no'.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np


def _define_flags() -> None:
  """Only when run as a script: the tests import this module beside eval.py's --workdir."""
  flags.DEFINE_string('workdir', 'workdirs/chaos', 'Where both runs go (replaced).')
  flags.DEFINE_integer('kills', 5, 'How many times to SIGKILL the run.')
  flags.DEFINE_integer('num_steps', 120, 'Training steps of each run.')
  flags.DEFINE_integer('checkpoint_every', 10, 'Steps between checkpoints.')
  flags.DEFINE_integer('seed', 0, 'Seed of the kill schedule.')
  flags.DEFINE_float('timeout_seconds', 600.0, 'Limit for each train.py process.')


TMP_MARK = '.orbax-checkpoint-tmp'
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # runs from any directory
# Metrics that depend on the wall clock, not on the computation.
_CLOCK_FIELDS = ('time', 'tokens_per_sec')
_WORDS = ('the lord said unto moses speak unto the children of israel and say unto them '
          'in the beginning god created the heaven and the earth').split()


def write_corpus(directory: str) -> str:
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  for split, lines in (('train', 300), ('validation', 30), ('test', 30)):
    with open(os.path.join(directory, f'{split}.txt'), 'w') as f:
      for _ in range(lines):
        f.write(' '.join(rng.choice(_WORDS, size=rng.integers(5, 30))) + '\n')
  return directory


def train_command(workdir: str, corpus: str, data_dir: str, num_steps: int,
                  checkpoint_every: int) -> list[str]:
  return [sys.executable, os.path.join(_ROOT, 'train.py'),
          f'--config={os.path.join(_ROOT, "configs", "gpt.py")}:size=tiny',
          f'--workdir={workdir}', f'--config.data.files={corpus}',
          f'--config.data.data_dir={data_dir}', '--config.data.vocab_size=128',
          f'--config.train.num_steps={num_steps}', '--config.train.log_every=1',
          f'--config.train.eval_every={num_steps}',
          f'--config.train.checkpoint_every={checkpoint_every}',
          '--config.train.keep_checkpoints=2']


def plan(kills: int, num_steps: int, checkpoint_every: int, seed: int) -> list[tuple[int, bool]]:
  """(step, during_save) for each kill: distinct steps after the first checkpoint."""
  rng = np.random.default_rng(seed)
  steps = sorted(rng.choice(np.arange(checkpoint_every + 1, num_steps - 1), kills, replace=False))
  during = rng.permutation([i < (kills + 1) // 2 for i in range(kills)])
  return [(int(s), bool(d)) for s, d in zip(steps, during)]


class Run:
  """One train.py process, its output appended to `<workdir>.log`."""

  def __init__(self, command: list[str], workdir: str):
    self.workdir = workdir
    self.metrics = os.path.join(workdir, 'metrics.jsonl')
    # Only lines this process appends count as its progress.
    self._offset = os.path.getsize(self.metrics) if os.path.exists(self.metrics) else 0
    self._log = open(workdir + '.log', 'a')
    self._log.write(f'\n=== {time.strftime("%H:%M:%S")} start\n')
    self._log.flush()
    self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

  def logged_step(self) -> int:
    if not os.path.exists(self.metrics):
      return 0
    with open(self.metrics, 'rb') as f:
      f.seek(self._offset)
      lines = f.read().split(b'\n')[:-1]  # the last piece may be a line being written
    return max((json.loads(line)['step'] for line in lines if line.strip()), default=0)

  def writing_checkpoint(self) -> bool:
    directory = os.path.join(self.workdir, 'checkpoints')
    return os.path.isdir(directory) and any(TMP_MARK in n for n in os.listdir(directory))

  def kill_at(self, step: int, during_save: bool, timeout: float) -> str | None:
    """SIGKILLs once `step` is logged (and, if `during_save`, a save is underway).

    Returns what was happening at the kill, or None if the run finished first.
    """
    deadline = time.time() + timeout
    while self.proc.poll() is None:
      if time.time() > deadline:
        raise TimeoutError(f'train.py did not reach step {step} in {timeout:.0f}s')
      # Saves are asynchronous and may span several steps: wait for the kind of moment asked.
      if self.logged_step() >= step and self.writing_checkpoint() == during_save:
        reached = self.logged_step()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        # What the process left behind says what it was doing: a tmp directory, a save.
        return f'step {reached}, ' + ('during a checkpoint write' if self.writing_checkpoint()
                                      else 'between saves')
      time.sleep(0.002 if self.logged_step() >= step else 0.02)
    return None

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      self._log.close()


def last_per_step(workdir: str, split: str) -> dict[int, dict[str, float]]:
  """The last record of each step (a resumed run re-logs the steps after its checkpoint)."""
  from training import metrics  # pylint: disable=g-import-not-at-top  (imports jax)
  records = {}
  for m in metrics.read_metrics(workdir):
    if m['split'] == split:
      records[m['step']] = {k: v for k, v in m.items() if k not in _CLOCK_FIELDS}
  return records


def final_state(workdir: str):
  """The state of the newest checkpoint of `workdir`, restored with the run's own config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from training import checkpoint  # pylint: disable=g-import-not-at-top
  from training import loop  # pylint: disable=g-import-not-at-top
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  step = mngr.latest_step()
  exp = loop.build(ml_collections.ConfigDict(checkpoint.restore_config(mngr, step)))
  abstract, shardings = exp.abstract_state()
  state = checkpoint.restore(mngr, step, abstract, shardings)
  mngr.close()
  return step, state


def compare(chaos_dir: str, reference_dir: str) -> list[str]:
  """What differs between the two runs' final states and logged curves; [] if nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  problems = []
  (step_a, a), (step_b, b) = final_state(chaos_dir), final_state(reference_dir)
  if step_a != step_b:
    problems.append(f'final checkpoints at steps {step_a} and {step_b}')
  leaves_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
  leaves_b = jax.tree_util.tree_leaves(jax.device_get(b))
  for (path, x), y in zip(leaves_a, leaves_b):
    if not np.array_equal(np.asarray(x), np.asarray(y)):
      problems.append(f'state leaf {jax.tree_util.keystr(path)} differs')
  for split in ('train', 'validation'):
    curve_a, curve_b = last_per_step(chaos_dir, split), last_per_step(reference_dir, split)
    if sorted(curve_a) != sorted(curve_b):
      problems.append(f'{split}: logged steps differ')
    for s in sorted(curve_a.keys() & curve_b.keys()):
      if curve_a[s] != curve_b[s]:
        problems.append(f'{split} step {s}: {curve_a[s]} vs {curve_b[s]}')
  return problems


def chaos(root: str, kills: int, num_steps: int, checkpoint_every: int, seed: int,
          timeout: float = 600.0) -> dict:
  """Runs both trainings under `root` and compares them; returns the figures."""
  shutil.rmtree(root, ignore_errors=True)
  corpus = write_corpus(os.path.join(root, 'corpus'))
  data_dir = os.path.join(root, 'data')
  chaos_dir, reference_dir = os.path.join(root, 'chaos'), os.path.join(root, 'reference')
  figures = {'killed': 0, 'resumed': 0, 'during_save': 0, 'kills': []}

  started = time.time()
  command = train_command(reference_dir, corpus, data_dir, num_steps, checkpoint_every)
  if Run(command, reference_dir).wait(timeout):
    raise RuntimeError(f'the uninterrupted run failed; see {reference_dir}.log')
  figures['reference_seconds'] = time.time() - started

  started = time.time()
  command = train_command(chaos_dir, corpus, data_dir, num_steps, checkpoint_every)
  for step, during_save in plan(kills, num_steps, checkpoint_every, seed):
    os.makedirs(chaos_dir, exist_ok=True)
    what = Run(command, chaos_dir).kill_at(step, during_save, timeout)
    if what is None:
      break  # finished before this kill: the plan outran the run
    figures['killed'] += 1
    figures['during_save'] += 'during' in what
    figures['kills'].append(what)
    print(f'killed at {what}', flush=True)
  final = Run(command, chaos_dir)
  if final.wait(timeout):
    raise RuntimeError(f'the chaos run failed after its kills; see {chaos_dir}.log')
  with open(chaos_dir + '.log') as f:
    figures['resumed'] = f.read().count('Resumed from')
  figures['chaos_seconds'] = time.time() - started
  figures['problems'] = compare(chaos_dir, reference_dir)
  return figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every restore at INFO
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  figures = chaos(f.workdir, f.kills, f.num_steps, f.checkpoint_every, f.seed, f.timeout_seconds)
  for problem in figures['problems'][:20]:
    print('  ' + problem)
  print(f"uninterrupted run {figures['reference_seconds']:.0f}s; chaos run "
        f"{figures['chaos_seconds']:.0f}s with {figures['during_save']} of "
        f"{figures['killed']} kills during a checkpoint write")
  identical = not figures['problems']
  print(f"runs killed: {figures['killed']}, resumed: {figures['resumed']}, "
        f"bitwise identical: {'yes' if identical else 'no'}")
  sys.exit(0 if identical else 1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
