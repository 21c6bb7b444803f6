"""Length generalisation: a finished run's validation perplexity at L, 2L, 4L, ...

  python -m studies.length_eval --workdir=workdirs/positions          # every point of a sweep
  python -m studies.length_eval --workdir=workdirs/positions/rope-s0 --factors=1,2,4

The run's config is re-built with `data.seq_len` (and the model's `max_len`, which follows
it) set to factor·L, the final checkpoint is restored into it, and `loop.evaluate` runs over
the validation split, so the numbers come from the code path of training's own evaluation.
The pipeline packs chapters into rows and chunks a chapter at seq_len, so a row of 4L holds
positions 0..4L-1 of one chapter (plus short chapters packed after it): the model meets
positions it never saw, with more context per token. The number of evaluation batches is
divided by the factor, so every length covers about the same validation tokens.

A scheme whose parameters depend on `max_len` (a learned table) has no embedding for
positions past L: it is reported as None ("n/a"), not evaluated.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

import models
from training import checkpoint
from training import loop
from training import sweep as sweep_lib

OUTPUT = 'length_eval.json'


def load_config(run_dir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(run_dir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def at_length(config: ml_collections.ConfigDict, factor: int) -> ml_collections.ConfigDict:
  """The run's config evaluated at factor·L over about the same number of tokens."""
  config = ml_collections.ConfigDict(config.to_dict())
  seq_len = config.data.seq_len * factor
  # config.json stores values, not the FieldReference tying max_len to seq_len: set both.
  config.data.seq_len = seq_len
  config.model.max_len = seq_len
  batches = config.train.eval_batches
  config.train.eval_batches = max(1, batches // factor) if batches else 0
  return config


def _param_shapes(model_config: dict) -> dict[str, tuple[int, ...]]:
  config_cls, model_cls = models.get('gpt')
  model = model_cls(config_cls(**model_config))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(x.shape) for p, x in flat}


def fixed_positions(model_config: dict) -> bool:
  """True when the parameters depend on max_len: the set of positions is fixed in advance."""
  longer = dict(model_config, max_len=2 * model_config['max_len'])
  return _param_shapes(model_config) != _param_shapes(longer)


def params_added(model_config: dict) -> int:
  """Parameters the scheme adds to the same model without positions."""
  def count(cfg):
    return sum(int(jnp.prod(jnp.array(s))) if s else 1 for s in _param_shapes(cfg).values())
  return count(model_config) - count(dict(model_config, position='none'))


def evaluate_run(run_dir: str, factors=(1, 2, 4)) -> dict:
  """{'position', 'fixed_positions', 'params_added', 'train_len', 'lengths': {T: report}}.

  A length the model cannot represent maps to None.
  """
  config = load_config(run_dir)
  model_config = config.model.to_dict()
  fixed = fixed_positions(model_config)
  mngr = checkpoint.manager(os.path.join(run_dir, 'checkpoints'), async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {run_dir}/checkpoints: train the run first')
  train_len = config.data.seq_len
  lengths = {}
  for factor in factors:
    seq_len = train_len * factor
    if fixed and factor > 1:
      lengths[seq_len] = None  # no embedding beyond L
      continue
    start = time.perf_counter()
    exp = loop.build(at_length(config, factor))
    abstract, shardings = exp.abstract_state()
    state = checkpoint.restore(mngr, step, abstract, shardings)
    with jax.set_mesh(exp.mesh):
      report = loop.evaluate(exp, state.params, loop.eval_split(exp, 'validation'),
                             loop.eval_fn(exp, shardings))
    lengths[seq_len] = dict({k: float(v) for k, v in report.items()},
                            seconds=time.perf_counter() - start)
  mngr.close()
  return {'position': model_config.get('position', 'learned'), 'fixed_positions': fixed,
          'params_added': params_added(model_config), 'train_len': train_len, 'step': step,
          'lengths': lengths}


def run_dirs(workdir: str) -> dict[str, str]:
  """{name: dir}: the workdir itself if it is a run, else its finished sweep points."""
  if os.path.exists(os.path.join(workdir, 'config.json')):
    return {os.path.basename(os.path.normpath(workdir)): workdir}
  return {name: os.path.join(workdir, name) for name in sorted(os.listdir(workdir))
          if sweep_lib.read_result(workdir, name) is not None}


def format_table(results: dict[str, dict]) -> str:
  width = max(12, *(len(name) for name in results))  # sweep names like 'sinusoidal-s2'
  lines = []
  for name, r in results.items():
    cells = [f'{v["perplexity"]:.2f}' if v else 'n/a' for v in r['lengths'].values()]
    lines.append(f'{name:<{width}} ' + ' '.join(f'{c:>9}' for c in cells))
  header = ' '.join(f'{"T=" + str(t):>9}' for t in next(iter(results.values()))['lengths'])
  return f'{"perplexity":<{width}} {header}\n' + '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a run, or a sweep of runs')
  parser.add_argument('--factors', default='1,2,4', help='evaluation lengths, in units of L')
  args = parser.parse_args(argv)
  factors = tuple(int(f) for f in args.factors.split(','))
  dirs = run_dirs(args.workdir)
  if not dirs:
    raise FileNotFoundError(f'{args.workdir}: neither a run nor a sweep with finished points')
  results = {}
  for name, run_dir in dirs.items():
    print(f'evaluating {name} at {factors} x L', flush=True)
    results[name] = evaluate_run(run_dir, factors)
  out = os.path.join(args.workdir, OUTPUT)
  # JSON keys are strings: the lengths come back as '64', '128', ...
  checkpoint.write_json(out, results)
  print(format_table(results))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
