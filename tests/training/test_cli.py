"""train.py and eval.py as a user runs them: bad input fails early and says what is wrong."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.training.test_loop import tiny_config
from training import checkpoint
from training import loop
from training import metrics


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


def test_watch_follows_a_running_training_job_to_its_final_step(tmp_path):
  """eval.py --watch started beside train.py evaluates each checkpoint as it lands."""
  config = tiny_config(tmp_path)
  workdir = tmp_path / 'run'
  overrides = [f'--config.data.files={config.data.files}',
               f'--config.data.data_dir={config.data.data_dir}',
               f'--config.data.vocab_size={config.data.vocab_size}',
               '--config.train.num_steps=6', '--config.train.checkpoint_every=2',
               '--config.train.eval_every=6', '--config.train.keep_checkpoints=5']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  train = subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/gpt.py:size=tiny', f'--workdir={workdir}',
       *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # The watcher needs the run's config.json, which train.py writes before its first step.
  deadline = time.time() + 300
  while not (workdir / 'config.json').exists():
    assert train.poll() is None, train.stdout.read()
    assert time.time() < deadline
    time.sleep(0.2)
  watch = run('eval.py', f'--workdir={workdir}', '--watch', '--poll_seconds=0.5',
              '--splits=validation', '--timeout_seconds=300')
  assert train.wait(timeout=300) == 0, train.stdout.read()
  assert watch.returncode == 0, watch.stderr
  evaluated = [int(line.split()[1]) for line in watch.stdout.splitlines()
               if line.startswith('step ')]
  assert evaluated[-1] == 6
  assert evaluated == sorted(set(evaluated))
  assert sorted(os.listdir(workdir / 'eval'))[-1] == 'step_6.json'


def _four_step_overrides(config) -> list[str]:
  """Flags for train.py: `config`'s data, 4 steps, every step logged, one eval and save."""
  return [f'--config.data.files={config.data.files}',
          f'--config.data.data_dir={config.data.data_dir}',
          f'--config.data.vocab_size={config.data.vocab_size}',
          '--config.train.num_steps=4', '--config.train.log_every=1',
          '--config.train.eval_every=4', '--config.train.checkpoint_every=4']


def _cpu_devices_env(devices: int) -> dict[str, str]:
  """The environment for a train.py on `devices` simulated CPU devices (the suite's own
  XLA flags kept: tests/conftest.py)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags.strip())


def _sharded_losses(tmp_path, shapes: tuple[str, ...]) -> tuple[dict[str, list], list[str]]:
  """(split, loss) of 4 steps of the tiny GPT on each mesh shape (8 simulated CPU devices;
  '(-1,1,1)': one device), and the runs' train.py flags."""
  config = tiny_config(tmp_path)
  overrides = _four_step_overrides(config)
  losses = {}
  for shape in shapes:
    devices = 1 if shape.startswith('(-1') else 8
    workdir = tmp_path / f'run{shape}'
    env = _cpu_devices_env(devices)
    subprocess.run([sys.executable, 'train.py', '--config=configs/gpt.py:size=tiny',
                    f'--workdir={workdir}', f'--config.mesh.shape={shape}', *overrides],
                   env=env, check=True, capture_output=True, timeout=600)
    losses[shape] = [(m['split'], m['loss']) for m in metrics.read_metrics(workdir)]
  return losses, overrides


def _assert_same_losses(losses: dict[str, list]) -> None:
  baseline = losses['(-1,1,1)']
  assert len(baseline) == 5  # 4 train steps and one validation
  for shape, run_losses in losses.items():
    assert len(run_losses) == len(baseline), shape  # zip below would drop missing steps
    for (split1, a), (split8, b) in zip(baseline, run_losses):
      assert split1 == split8
      assert a == pytest.approx(b, rel=1e-5), shape


@pytest.mark.slow  # data=2 x fsdp=2 x tensor=2 below covers each axis in the default suite
def test_pure_data_and_pure_fsdp_runs_follow_the_single_device_run(tmp_path):
  _assert_same_losses(_sharded_losses(tmp_path, ('(-1,1,1)', '(8,1,1)', '(1,8,1)'))[0])


def test_sharded_runs_follow_the_single_device_run(tmp_path):
  """data=2 x fsdp=2 x tensor=2 on 8 simulated CPU devices gives the single-device losses
  (to float32 reduction-order differences), and its checkpoint restores on another mesh."""
  losses, overrides = _sharded_losses(tmp_path, ('(-1,1,1)', '(2,2,2)'))
  _assert_same_losses(losses)
  # The 2x2x2 checkpoint restores in this single-device process (eval.py's mesh).
  result = run('eval.py', f'--workdir={tmp_path / "run(2,2,2)"}', '--splits=validation')
  assert result.returncode == 0, result.stderr
  assert f"{losses['(2,2,2)'][-1][1]:.4f}" in result.stdout
  # ... and training resumes from it on a different 8-device mesh.
  overrides[3] = '--config.train.num_steps=5'
  resumed = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt.py:size=tiny',
       f'--workdir={tmp_path / "run(2,2,2)"}', '--config.mesh.shape=(1,8,1)', *overrides],
      env=_cpu_devices_env(8),
      capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'at step 4.' in resumed.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_through_jax_distributed_and_restore_on_one(tmp_path):
  """2 processes x 4 CPU devices on localhost train like 1 process x 8 devices (every
  process packs the same global batch and feeds its own rows of it); one checkpoint,
  readable by 1 process."""
  config = tiny_config(tmp_path)
  overrides = _four_step_overrides(config)
  # The reference first: it also prepares the data and tokenizer the two processes share.
  single = tmp_path / 'single'
  subprocess.run([sys.executable, 'train.py', '--config=configs/gpt.py:size=tiny',
                  f'--workdir={single}', *overrides],
                 env=_cpu_devices_env(8),
                 check=True, capture_output=True, timeout=600)
  workdir = tmp_path / 'run'
  port = _free_port()
  env = _cpu_devices_env(4)
  procs = [subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/gpt.py:size=tiny', f'--workdir={workdir}',
       *overrides,
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  step_dir = workdir / 'checkpoints' / '4'
  # Each host saved its own data-iterator position; process 0 alone wrote metrics.
  assert sorted(os.listdir(step_dir / 'data'))[-2:] == ['process_0-of-2.json',
                                                         'process_1-of-2.json']
  # ... and both are the one-process run's position in the same stream of global batches.
  position = (single / 'checkpoints' / '4' / 'data' / 'process_0-of-1.json').read_text()
  for i in range(2):
    assert (step_dir / 'data' / f'process_{i}-of-2.json').read_text() == position
  logged = [m for m in metrics.read_metrics(workdir)]
  assert [m['step'] for m in logged if m['split'] == 'train'] == [1, 2, 3, 4]
  # The same losses at every step and in the final validation, to rel 1e-5. Not bitwise:
  # the gradient all-reduce and the loss sums run across processes (gloo) in another order
  # than within one process, and float32 sums in another order round differently (we see
  # up to ~7e-8). Hosts that read different records (per-host record sharding) differ by
  # 2e-4 to 5e-3 here, so this fails unless the global batches are the same.
  reference = [(m['step'], m['split'], m['loss']) for m in metrics.read_metrics(single)]
  assert len(reference) == 5  # 4 train steps and one validation
  assert [(m['step'], m['split']) for m in logged] == [r[:2] for r in reference]
  for m, (_, _, loss) in zip(logged, reference):
    assert m['loss'] == pytest.approx(loss, rel=1e-5), (m, loss)
  validation = [m for m in logged if m['split'] == 'validation'][-1]
  # The 8-device checkpoint restores in this single-process, single-device evaluation.
  result = run('eval.py', f'--workdir={workdir}', '--splits=validation')
  assert result.returncode == 0, result.stderr
  assert f"{validation['loss']:.4f}" in result.stdout
