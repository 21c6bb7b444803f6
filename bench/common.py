"""What the speed benchmarks against a peer share: worker processes, turns, a matmul rate.

Each side (ours, a peer, ...) runs in a worker process of its own, started with its own
environment, so neither's thread pool competes with the other's and each runs with the
malloc settings it runs best with. The driver asks the workers for measurements in turns,
rotating who goes first each round, so a noisy machine slows every side alike.

A side is a class built as `cls(argument)` in its worker; it has `warm_up()` (compiling,
warming the allocator) and whatever methods the driver calls as `side(method, argument)`.
"""

import contextlib
import multiprocessing
import os
import platform
import time

from training import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), 'docs')
MATMUL_N = 2048


def best_rate(matmul, repeats: int, n: int = MATMUL_N) -> float:
  """GFLOP/s of the fastest of `repeats` calls of an n x n x n matmul (after a warm-up)."""
  matmul()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def timed(fn, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `fn` (which must wait for its own results)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _worker(cls, argument, conn) -> None:
  """Builds one side and warms it up, then answers (method, argument) requests."""
  bench = cls(argument)
  bench.warm_up()
  conn.send('ready')
  while True:
    method, arg = conn.recv()
    if method is None:
      return
    conn.send(getattr(bench, method)(arg))


@contextlib.contextmanager
def environment(overrides: dict[str, str | None]):
  """os.environ with `overrides` (None removes a variable), for starting a worker."""
  saved = dict(os.environ)
  for name, value in overrides.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  try:
    yield
  finally:
    os.environ.clear()
    os.environ.update(saved)


class Side:
  """A worker process holding `cls(argument)`, started with its own environment, and a
  blocking call into it."""

  def __init__(self, cls, argument, env: dict[str, str | None]):
    context = multiprocessing.get_context('spawn')
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_worker, args=(cls, argument, child), daemon=True)
    with environment(env):
      self.process.start()

  def wait_ready(self) -> None:
    if self.conn.recv() != 'ready':
      raise RuntimeError('worker failed to start')

  def __call__(self, method: str, argument=None):
    self.conn.send((method, argument))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send((None, None))
    self.process.join(timeout=30)


@contextlib.contextmanager
def started(specs: dict[str, tuple]):
  """{name: Side} for {name: (cls, argument, env)}, each ready in turn (they would all
  compile at once otherwise), closed on exit."""
  sides = {name: Side(*spec) for name, spec in specs.items()}
  try:
    for side in sides.values():
      side.wait_ready()
    yield sides
  finally:
    for side in sides.values():
      side.close()


def round_order(names: list[str], r: int) -> list[str]:
  """The sides' order in round r: rotated by one each round (two sides: swapped)."""
  shift = r % len(names)
  return names[shift:] + names[:shift]


def tunables_env(peer_tunables: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
  """(ours, peer) environments: ours with the GLIBC_TUNABLES the Makefile exports, the
  peer with glibc's defaults ('default') or ours ('ours')."""
  ours = os.environ.get('GLIBC_TUNABLES')
  return ({'GLIBC_TUNABLES': ours},
          {'GLIBC_TUNABLES': ours if peer_tunables == 'ours' else None})


def machine_line() -> str:
  return f'Machine: {metrics.describe_machine()}, Python {platform.python_version()}'
