"""Nothing lost: damaged checkpoints, non-finite steps, preemption, kills and bad input."""

import glob
import importlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from data import text_files
import objectives
from objectives import causal_lm
from tests.training.conftest import PLANTED_PARTIAL
from tests.training.conftest import PLANTED_RECORD
from tests.training.conftest import PLANTED_TMP
from tests.training.test_loop import tiny_config
from training import chaos
from training import checkpoint
from training import loop
from training import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def _copy(run_dir, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_dir, workdir)
  return workdir


def _alter_an_element(workdir, step, array):
  """Changes one bit of one element of the named array of the step's saved state.

  The chunks are zstd-compressed, so flipping a byte of a file may break decoding (a read
  error, not the checksum's message) and lands in whichever array the file holds. Writing
  the altered value through tensorstore keeps every file decodable and alters exactly the
  array named: a silent change that only the checksum can catch.
  """
  state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
  store = ts.open({'driver': 'zarr', 'kvstore': {
      'driver': 'ocdbt', 'base': 'file://' + state_dir, 'path': array.replace('/', '.') + '/'}},
      open=True).result()
  values = store.read().result()
  bits = values.reshape(-1).view(f'uint{8 * values.dtype.itemsize}').copy()
  bits[bits.size // 2] ^= 1 << 20
  store.write(bits.view(values.dtype).reshape(values.shape)).result()
  assert not np.array_equal(store.read().result(), values)


def _saved_array(workdir, step, kind):
  """A parameter ('params') or an Adam second-moment ('opt_state') kernel of the step, by name."""
  with open(os.path.join(workdir, 'checkpoints', str(step), 'integrity', 'metadata')) as f:
    names = sorted(json.load(f))
  wanted = {'params': lambda n: n.startswith('params/'),
            'opt_state': lambda n: n.startswith('opt_state/') and '/nu/' in n}[kind]
  return [n for n in names if wanted(n) and n.endswith('kernel')][-1]


@pytest.mark.parametrize('kind', ['params', 'opt_state'])
def test_an_altered_array_fails_its_checksum_naming_it(finished_run, tmp_path, kind):
  _, run_dir = finished_run
  workdir = _copy(run_dir, tmp_path)
  array = _saved_array(workdir, 5, kind)
  _alter_an_element(workdir, 5, array)
  evaluator = importlib.import_module('eval').Evaluator(workdir)
  with pytest.raises(checkpoint.DamagedCheckpointError) as e:
    evaluator.restore(5)
  assert str(e.value).endswith(
      f'checkpoints/5 is damaged: 1 array(s) fail their checksum ({array})')
  evaluator.restore(4)  # the untouched one still restores


def test_eval_skips_a_damaged_latest_checkpoint_without_moving_it(finished_run, tmp_path):
  _, run_dir = finished_run
  workdir = _copy(run_dir, tmp_path)
  _alter_an_element(workdir, 5, _saved_array(workdir, 5, 'params'))
  result = _run_cli('eval.py', f'--workdir={workdir}', '--splits=validation')
  assert result.returncode == 0, result.stderr
  assert 'checkpoints/5 is damaged' in result.stdout and 'skipping it' in result.stdout
  assert '\nstep 4\n' in result.stdout and '\nstep 5\n' not in result.stdout
  assert _checkpoints(workdir) == ['4', '5']  # a reader leaves the workdir as it found it

  named = _run_cli('eval.py', f'--workdir={workdir}', '--step=5', '--splits=validation')
  assert named.returncode != 0
  assert 'checkpoints/5 is damaged' in named.stderr
  assert '--step=5 cannot be evaluated; the checkpoints are [4, 5]' in named.stderr

  # --watch evaluates step 4, reports the damaged final step 5 and stops after it.
  watched = _run_cli('eval.py', f'--workdir={workdir}', '--watch', '--splits=validation',
                     '--poll_seconds=0.1', '--timeout_seconds=60')
  assert watched.returncode == 0, watched.stderr
  assert '\nstep 4\n' in watched.stdout and '\nstep 5\n' not in watched.stdout
  assert 'checkpoints/5 is damaged' in watched.stdout and 'skipping it' in watched.stdout
  assert _checkpoints(workdir) == ['4', '5']


def test_a_save_in_progress_is_not_listed_nor_removed_by_readers(finished_run, tmp_path):
  _, run_dir = finished_run
  workdir = _copy(run_dir, tmp_path)
  in_progress = os.path.join(workdir, 'checkpoints', '7.orbax-checkpoint-tmp-1234567890')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '5'), in_progress)
  evaluator = importlib.import_module('eval').Evaluator(workdir)
  evaluator.mngr.reload()  # as --watch does on each poll
  assert evaluator.mngr.all_steps() == [4, 5]
  assert os.path.isdir(in_progress)


def test_the_last_keep_checkpoints_steps_and_the_final_step_are_kept(finished_run):
  config, run_dir = finished_run
  assert config.train.num_steps % config.train.checkpoint_every  # 5 is not a save step...
  assert config.train.keep_checkpoints == 2
  assert _checkpoints(run_dir) == ['4', '5']  # ... but is saved; step 2 was removed


def test_a_start_drops_what_a_killed_run_left_half_written(finished_run):
  """A crash's unfinished save is removed and a half-written metrics line dropped."""
  _, run_dir = finished_run
  assert not os.path.exists(os.path.join(run_dir, PLANTED_TMP))
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    text = f.read()
  assert text.startswith(PLANTED_RECORD) and PLANTED_PARTIAL not in text
  records = metrics.read_metrics(run_dir)  # every line parses
  assert [m['step'] for m in records if m['split'] == 'train'] == [1, 2, 3, 4, 5]


def _tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the event files in `directory` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
    data = pathlib.Path(path).read_bytes()
    offset = 0
    while offset < len(data):  # u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[offset:offset + 8], 'little')
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_mirrors_the_logged_metrics(finished_run):
  _, run_dir = finished_run
  scalars = _tensorboard_scalars(os.path.join(run_dir, 'tensorboard'))
  logged = [m for m in metrics.read_metrics(run_dir) if m['split'] in ('train', 'validation')]
  assert logged
  for m in logged:
    assert scalars[f"{m['split']}/loss"][m['step']] == pytest.approx(m['loss'], rel=1e-6)


_WATCHDOG = """
import os, signal, sys, time
from training import preemption
with preemption.Preemption(grace_seconds=0.5) as pre:
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.2)
  print('requested', pre.requested, flush=True)
  time.sleep(60)  # a save that never finishes
"""


def test_the_preemption_watchdog_exits_143_after_the_grace_period():
  start = time.time()
  result = subprocess.run([sys.executable, '-c', _WATCHDOG], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
  assert result.returncode == 143, result.stderr
  assert time.time() - start < 30
  assert 'requested True' in result.stdout
  assert 'no clean exit 0s after SIGTERM; exiting now' in result.stdout


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)


def _set(config, **fields):
  """Sets dotted fields of a locked config as a --config.x.y= override does."""
  config.unlock()
  for name, value in fields.items():
    section, key = name.split('__')
    config[section][key] = value
  config.lock()


def _corpus(tmp_path, files: dict[str, bytes]) -> str:
  directory = tmp_path / 'bad_corpus'
  directory.mkdir()
  for name, data in files.items():
    (directory / name).write_bytes(data)
  return str(directory)


_LINES = b''.join(b'in the beginning god created the heaven and the earth %d\n' % i
                  for i in range(40))

# (case, make, message): make(config, tmp_path, finished run's workdir) alters the config in
# place and returns the workdir to train in, or None for a fresh one.
BAD_INPUT = [
    ('unknown config field', lambda c, t, w: setattr(c.train, 'num_stepz', 3),
     'Key "num_stepz" does not exist'),
    ('wrong type', lambda c, t, w: setattr(c.train, 'num_steps', 'abc'),
     "Could not override field 'num_steps'"),
    ('heads not dividing the width', lambda c, t, w: _set(c, model__num_heads=3),
     'GPTConfig.num_heads=3 must divide GPTConfig.embed_dim=32'),
    ('mesh not dividing the devices', lambda c, t, w: _set(c, mesh__shape=(3, 1, 1)),
     'config.mesh.shape=(3, 1, 1) does not divide the 1 devices'),
    ('empty data file',
     lambda c, t, w: _set(c, data__files=_corpus(t, {'train.txt': b'', 'test.txt': _LINES})),
     'train.txt: the file is empty'),
    ('binary data file',
     lambda c, t, w: _set(c, data__files=_corpus(t, {'train.txt': _LINES + b'\x00\x01\x02\n'})),
     'train.txt: line 41 holds a NUL byte; this looks like a binary file'),
    ('a line longer than the maximum',
     lambda c, t, w: _set(c, data__files=_corpus(
         t, {'train.txt': _LINES + b'x' * (text_files.MAX_LINE_BYTES + 1) + b'\n'})),
     'train.txt: line 41 is 1,048,577 bytes long, over the 1,048,576 a line may hold'),
    ('parallel files of different lengths',
     lambda c, t, w: _set(c, data__text_key='en', data__files=_corpus(
         t, {'train.en': _LINES, 'train.es': _LINES.split(b'\n', 30)[-1]})),
     'parallel files are not line-aligned: '),
    ('another model\'s checkpoint',
     lambda c, t, w: (_set(c, model__embed_dim=64), _copy(w, t))[1],
     'parameter(s) differ'),
    ('unwritable workdir',
     lambda c, t, w: (t / 'file').write_text('x') and str(t / 'file' / 'run'),
     'is not writable'),
]


@pytest.mark.parametrize('make, message', [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_fails_early_with_a_message_saying_what_is_wrong(finished_run, tmp_path,
                                                                  make, message):
  config, run_dir = finished_run
  config = loop.ml_collections.ConfigDict(config.to_dict())  # a copy; the fixture's stays as is
  config.lock()
  with pytest.raises(Exception) as e:
    workdir = make(config, tmp_path, run_dir) or str(tmp_path / 'fresh')
    loop.train_and_evaluate(config, workdir)
  assert message in str(e.value)


def test_project_code_loads_nothing_through_pickle():
  """Checkpoints load through Orbax and weights through safetensors; never by unpickling."""
  unsafe = re.compile(r'pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\(|dill\.loads?\(')
  offenders = []
  for path in ROOT.rglob('*.py'):
    relative = path.relative_to(ROOT)
    if relative.parts[0] in ('.venv', 'tests', 'workdirs') or relative.parts[0].startswith('.'):
      continue  # tests may round-trip their own objects
    for number, line in enumerate(path.read_text().splitlines(), start=1):
      if unsafe.search(line):
        offenders.append(f'{relative}:{number}: {line.strip()}')
  assert not offenders, 'unsafe loading in project code:\n' + '\n'.join(offenders)


@pytest.mark.slow
def test_chaos_two_kills_resume_bitwise_identical(tmp_path):
  figures = chaos.chaos(str(tmp_path / 'chaos'), kills=2, num_steps=30, checkpoint_every=5,
                        seed=1)
  assert figures['killed'] == 2 and figures['resumed'] == 2
  assert not figures['problems'], figures['problems']
