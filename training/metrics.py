"""Where metrics go: a JSONL file and TensorBoard event files in the workdir, and a progress bar."""

import json
import os
import platform
import sys
import time

import jax
import tensorboardX
import tqdm


class MetricWriter:
  """Appends `{"step": s, "split": ..., **metrics}` lines to metrics.jsonl; mirrors to TensorBoard.

  Only process 0 writes. Lines are flushed at once, so a crash loses nothing logged before it.
  """

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      _drop_partial_line(path)
      self._jsonl = open(path, 'a')
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self._active:
      return
    record = {'step': int(step), 'split': split, 'time': time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f'{split}/{name}', float(value), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


def _drop_partial_line(path: str) -> None:
  """Cuts a last line left unfinished by a killed run, so appended records stay parseable."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if data and not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)


def progress_bar(start: int, total: int) -> tqdm.tqdm:
  """A bar from the resumed step to the last; quiet on hosts other than 0."""
  return tqdm.tqdm(initial=start, total=total, unit='step', dynamic_ncols=True,
                   file=sys.stderr, disable=jax.process_index() != 0, smoothing=0.1)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def describe_machine() -> str:
  """'N cores (nproc), <CPU model>; jax X on <backend>': the header of every measurement."""
  cpu = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return (f'{os.cpu_count()} cores (nproc), {cpu}; jax {jax.__version__} on '
          f'{jax.default_backend()}')
