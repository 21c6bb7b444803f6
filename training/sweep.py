"""Runs every point of a config's `sweep()` into its own workdir, then prints a table.

  python -m training.sweep --config=configs/gpt_positions.py --workdir=workdirs/positions
  python -m training.sweep --config=configs/gpt_positions.py:steps=50 --workdir=/tmp/p

A config module with a sweep defines `sweep(arg) -> {point name: get_config argument}`; the
text after ':' in --config goes to `sweep`. Point `name` trains into WORKDIR/name with
`loop.train_and_evaluate`. A point whose `result.json` exists is finished and skipped; an
interrupted one resumes from its checkpoints, so re-running the command continues a sweep.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from types import ModuleType

from absl import logging
import ml_collections

from training import checkpoint
from training import loop

RESULT = 'result.json'


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its name (the sub-directory) and its config."""
  name: str
  config: ml_collections.ConfigDict


def load_module(path: str) -> ModuleType:
  """The config module at `path` (a file, so configs need not be an importable package)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'configs.{name}', path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f'--config={path}: no such config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def points(config_arg: str) -> list[Point]:
  """The points of `configs/x.py[:arg]`: `get_config` of each argument `sweep(arg)` lists."""
  path, _, arg = config_arg.partition(':')
  module = load_module(path)
  if not hasattr(module, 'sweep'):
    raise ValueError(f'{path} has no sweep(): nothing to run')
  return [Point(name, module.get_config(point_arg))
          for name, point_arg in module.sweep(arg or None).items()]


def result_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, RESULT)


def read_result(workdir: str, name: str) -> dict | None:
  """The finished point's result, or None if it has not finished."""
  path = result_path(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def final_step(point_dir: str) -> int | None:
  mngr = checkpoint.manager(os.path.join(point_dir, 'checkpoints'), async_save=False)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def run_point(point: Point, workdir: str) -> dict:
  """Trains one point to its last step (resuming) and records its result."""
  point_dir = os.path.join(workdir, point.name)
  start = time.perf_counter()
  report = loop.train_and_evaluate(point.config, point_dir)
  seconds = time.perf_counter() - start
  step = final_step(point_dir)
  num_steps = point.config.train.num_steps
  if step != num_steps:
    # Preempted (train_and_evaluate returned early): not finished, so no result.json.
    raise RuntimeError(f'{point.name} stopped at step {step} of {num_steps}; re-run to resume')
  os.makedirs(point_dir, exist_ok=True)
  result = {'name': point.name, 'steps': num_steps, 'train_seconds': seconds,
            'validation': {k: float(v) for k, v in report.items()},
            'config': point.config.to_dict()}
  checkpoint.write_json(result_path(workdir, point.name), result)
  return read_result(workdir, point.name)  # as JSON has it, like a skipped point's


def run(sweep_points: list[Point], workdir: str) -> dict[str, dict]:
  """Runs the unfinished points in order; {name: result} of all of them."""
  names = [p.name for p in sweep_points]
  if len(set(names)) != len(names):
    raise ValueError(f'sweep point names must be unique, got {names}')
  results = {}
  for i, point in enumerate(sweep_points, 1):
    done = read_result(workdir, point.name)
    if done is not None:
      print(f'[{i}/{len(sweep_points)}] {point.name}: finished, skipped', flush=True)
      results[point.name] = done
      continue
    print(f'[{i}/{len(sweep_points)}] {point.name}: training into '
          f'{os.path.join(workdir, point.name)}', flush=True)
    results[point.name] = run_point(point, workdir)
    print(f'[{i}/{len(sweep_points)}] {point.name}: done in '
          f"{results[point.name]['train_seconds']:.0f}s", flush=True)
  return results


def table(results: dict[str, dict]) -> str:
  """A markdown table of each point's final validation report."""
  metrics = ('loss', 'perplexity', 'accuracy')
  lines = ['| point | ' + ' | '.join(metrics) + ' | train s |',
           '|---|' + '---|' * (len(metrics) + 1)]
  for name, r in results.items():
    values = ' | '.join(f"{r['validation'].get(m, float('nan')):.4f}" for m in metrics)
    lines.append(f"| {name} | {values} | {r['train_seconds']:.0f} |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/x.py[:sweep argument]')
  parser.add_argument('--workdir', required=True, help='each point trains into WORKDIR/name')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  results = run(points(args.config), args.workdir)
  print('\n' + table(results))


if __name__ == '__main__':
  main()
