"""Feature extraction: hidden states of chosen layers of a checkpoint, per split, on disk.

  python -m studies.features --workdir=W --task=paraphrase --layers=-1,-2,-4..-1 \\
      --pooling=mean --splits=train,validation,test [--step=N] [--out=DIR]
  python -m studies.feature_probe --features=W/features/paraphrase/step_N

The run's experiment is rebuilt from its workdir (eval.Evaluator), a checkpoint restored
and its encoder run under jax.jit over one pass of each split of a task of data/tasks.py,
tokenized as the run tokenizes (the run's tokenizer and seq_len). Each split becomes
`<out>/<split>.npz` (default out: W/features/<task>/step_<N>), holding

  layers[<spec>]  float32 [N, F] pooled per example, or [N, T, F] with --pooling=tokens
  label           [N] the task's labels
  index           [N] each example's index in the split
  mask            [N, T] bool, real tokens (--pooling=tokens only; also `tokens` [N, T])
  meta            a JSON string: task, step, workdir, split, pooling, layers, ...

A layer spec indexes the model's hidden states (embeddings, layer 1, ..., layer L) as Python
indexes them: -1 is the last layer, 0 the embeddings; `a..b` (both ends included) is the
concatenation of layers a to b along the feature axis, so `-4..-1` is the "last four
concatenated" of Devlin et al. 2019, section 5.3. Pooling is by name (models/heads.py):
mean or max over real tokens (segment_ids != 0), cls the layer's state at position 0 (not
the pooler's output). Rows that pad the last batch (example_weight 0) are dropped, so N is
the split's number of examples (or --max_examples). One host: the features are gathered
in its memory (--pooling=tokens keeps N·T·F floats: use --max_examples on large splits).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from data import encoder_data
from data import pipeline
from data import tasks as tasks_lib
from models import heads
from training import sharding

POOLINGS = (*heads.POOLINGS, 'tokens')
MODEL_FEATURES = ('inputs', 'token_types', 'segment_ids', 'positions')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One feature array: `text` as the user wrote it, `indices` (>= 0) into hidden_states,
  concatenated in this order."""
  text: str
  indices: tuple[int, ...]

  @property
  def key(self) -> str:
    return f'layers[{self.text}]'


def _index(text: str, num_states: int, spec: str) -> int:
  try:
    i = int(text)
  except ValueError:
    raise ValueError(f'layer spec {spec!r}: {text!r} is not an integer') from None
  if not -num_states <= i < num_states:
    raise ValueError(f'layer spec {spec!r}: {i} is out of range for {num_states} hidden '
                     f'states (embeddings + {num_states - 1} layers)')
  return i % num_states


def parse_layers(text: str | Sequence[str], num_states: int) -> tuple[LayerSpec, ...]:
  """'-1,-2,-4..-1' -> specs; num_states = layers + 1 (hidden_states has the embeddings)."""
  parts = text.split(',') if isinstance(text, str) else list(text)
  specs = []
  for part in (p.strip() for p in parts):
    if not part:
      continue
    if '..' in part:
      lo, hi = (_index(t, num_states, part) for t in part.split('..', 1))
      if lo > hi:
        raise ValueError(f'layer spec {part!r}: the range runs backwards ({lo} > {hi})')
      indices = tuple(range(lo, hi + 1))
    else:
      indices = (_index(part, num_states, part),)
    specs.append(LayerSpec(part, indices))
  if not specs:
    raise ValueError(f'no layer specs in {text!r}')
  keys = [s.key for s in specs]
  if len(set(keys)) != len(keys):
    raise ValueError(f'layer specs repeat: {keys}')
  return tuple(specs)


def features_fn(model, specs: Sequence[LayerSpec], pooling: str):
  """A jitted (params, batch) -> {spec key: [B, F] (or [B, T, F] for 'tokens')} float32."""
  if pooling not in POOLINGS:
    raise ValueError(f'unknown pooling {pooling!r} (known: {", ".join(POOLINGS)})')

  def fn(params, batch):
    out = model.apply({'params': params}, batch['inputs'],
                      token_types_BT=batch.get('token_types'),
                      segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'],
                      deterministic=True, hidden_states=True)
    states = out['hidden_states']
    features = {}
    for spec in specs:
      h_BTF = jnp.concatenate([states[i] for i in spec.indices], axis=-1)
      if pooling != 'tokens':
        h_BTF = heads.POOLINGS[pooling](h_BTF, batch['segment_ids'])
      features[spec.key] = h_BTF.astype(jnp.float32)
    return features

  return jax.jit(fn)


def num_hidden_states(model, params, seq_len: int) -> int:
  """len(hidden_states) of the model (embeddings + layers), from shapes alone."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  out = jax.eval_shape(lambda p, t: model.apply({'params': p}, t, hidden_states=True),
                       params, tokens)
  if 'hidden_states' not in out:
    raise ValueError(f'{type(model).__name__} returns no hidden_states: not an encoder')
  return len(out['hidden_states'])


def extract(fn, params, batches: Iterable[dict], *, pooling: str, max_examples: int = 0,
            mesh=None, rules=(), progress: str | None = None) -> dict[str, np.ndarray]:
  """Runs `fn` (features_fn) over `batches`, keeping the rows of weight > 0 (and the first
  max_examples of them, if > 0): {spec key: [N, ...], 'label', 'index' (+ 'mask', 'tokens')}."""
  batch_sharding = sharding.batch_sharding(mesh, rules) if mesh is not None else None
  parts = collections.defaultdict(list)
  pending = collections.deque()  # one batch in flight while the host reads the next
  seen = kept = 0

  def collect(item):
    nonlocal kept
    keep, host, device = item
    for k, v in jax.device_get(device).items():
      parts[k].append(np.asarray(v)[keep])
    for k, v in host.items():
      parts[k].append(v[keep])
    kept += int(keep.sum())

  total = len(batches) if hasattr(batches, '__len__') else None
  for batch in tqdm.tqdm(batches, desc=progress, total=total, disable=progress is None,
                         unit='batch', leave=False):
    keep = batch['example_weight'] > 0
    if max_examples:
      keep &= seen + np.cumsum(keep) <= max_examples
    seen += int(keep.sum())
    inputs = {k: batch[k] for k in MODEL_FEATURES if k in batch}
    if batch_sharding is not None:
      inputs = sharding.global_batch(inputs, batch_sharding)
    host = {'label': batch['label']}
    if pooling == 'tokens':
      host.update(mask=batch['segment_ids'] != 0, tokens=batch['inputs'])
    pending.append((keep, host, fn(params, inputs)))
    if len(pending) > 1:
      collect(pending.popleft())
    if max_examples and seen >= max_examples:
      break
  while pending:
    collect(pending.popleft())
  if not parts:
    raise ValueError('no batches to extract features from')
  # Eval batches run through the split in order: row i is example i.
  return {**{k: np.concatenate(v) for k, v in parts.items()}, 'index': np.arange(kept)}


def save_npz(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  """Writes arrays + a `meta` JSON string atomically: readers never see half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:  # a file object: np.savez adds no '.npz' to the name
    np.savez(f, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
  os.replace(tmp, path)


def load_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(arrays, meta) of a file save_npz wrote; no pickles are read."""
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files if k != 'meta'}
    meta = json.loads(str(data['meta']))
  return arrays, meta


def feature_keys(arrays: dict) -> list[str]:
  return [k for k in arrays if k.startswith('layers[')]


def extract_task(exp, params, task, splits: Sequence[str], layers, pooling: str, out_dir: str,
                 *, meta: dict | None = None, max_examples: int = 0, batch_size: int = 0,
                 progress: bool = True) -> dict[str, str]:
  """Writes `<out_dir>/<split>.npz` for each split of a classification `task` (a name of
  data/tasks.py or a task object) with the experiment `exp` (loop.build) and its `params`;
  returns {split: path}. The task's examples are built with the run's data config."""
  task = tasks_lib.get_task(task)
  if getattr(task, 'num_classes', None) is None:
    raise ValueError(f'task {task.name!r} has no labels: features are for classification '
                     f'or regression tasks ({", ".join(sorted(_labelled_tasks()))})')
  data = dataclasses.replace(exp.data, task=task.name, dupe_factor=0,
                             batch_size=batch_size or exp.data.batch_size)
  if jax.process_count() > 1:
    raise NotImplementedError('feature extraction gathers every row on one host')
  num_states = num_hidden_states(exp.model, params, data.seq_len)
  specs = parse_layers(layers, num_states)
  fn = features_fn(exp.model, specs, pooling)
  paths = {}
  for split in splits:
    batches = encoder_data.task_eval_batches(
        task, data, exp.tokenizer, split,
        max_batches=-(-max_examples // data.batch_size) if max_examples else 0)
    with jax.set_mesh(exp.mesh):
      arrays = extract(fn, params, batches, pooling=pooling, max_examples=max_examples,
                       mesh=exp.mesh, rules=exp.rules,
                       progress=f'{task.name} {split}' if progress else None)
    n = len(arrays['label'])
    expected = min(batches.num_examples, max_examples or batches.num_examples)
    if n != expected:
      raise AssertionError(f'{split}: kept {n} rows, expected {expected} examples')
    split_meta = {
        **(meta or {}), 'task': task.name, 'num_classes': task.num_classes, 'split': split,
        'pooling': pooling, 'num_examples': n, 'split_examples': batches.num_examples,
        'complete': n == batches.num_examples, 'num_hidden_states': num_states,
        'seq_len': data.seq_len, 'data_dir': os.fspath(pipeline.data_dir(data)),
        'layers': {s.key: list(s.indices) for s in specs},
        'dims': {s.key: int(arrays[s.key].shape[-1]) for s in specs}}
    paths[split] = os.path.join(out_dir, f'{split}.npz')
    save_npz(paths[split], arrays, split_meta)
  return paths


def _labelled_tasks() -> list[str]:
  return [n for n, t in tasks_lib.TASKS.items() if getattr(t, 'num_classes', None) is not None]


def describe(path: str) -> str:
  arrays, meta = load_npz(path)
  shapes = ', '.join(f'{k} {list(arrays[k].shape)}' for k in feature_keys(arrays))
  return f'{path}: {meta["num_examples"]} examples of {meta["split"]}; {shapes}'


def run(workdir: str, task: str, layers: str, pooling: str, splits: Sequence[str], *,
        step: int | None = None, out: str | None = None, max_examples: int = 0,
        batch_size: int = 0, progress: bool = True) -> dict[str, str]:
  """The command: restore `workdir`'s checkpoint (the latest, or `step`) and write features."""
  import eval as eval_lib  # pylint: disable=g-import-not-at-top  (the top-level driver)
  evaluator = eval_lib.Evaluator(workdir)
  if step is None:
    state, step = evaluator.restore_latest()
  else:
    steps = sorted(evaluator.mngr.all_steps())
    if step not in steps:
      raise ValueError(f'--step={step} is not among the checkpoints {steps}')
    state = evaluator.restore(step)
  out = out or os.path.join(workdir, 'features', task.replace('/', '_'), f'step_{step}')
  meta = {'workdir': os.path.abspath(workdir), 'step': int(step),
          'model_name': evaluator.config.model_name}
  return extract_task(evaluator.exp, state.params, task, splits, layers, pooling, out,
                      meta=meta, max_examples=max_examples, batch_size=batch_size,
                      progress=progress)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a train.py workdir of an encoder')
  parser.add_argument('--task', required=True, help=f'one of {", ".join(_labelled_tasks())}')
  parser.add_argument('--layers', default='-1',
                      help='layer specs, e.g. -1,-2,-4..-1 (a..b: those layers concatenated)')
  parser.add_argument('--pooling', default='mean', choices=POOLINGS)
  parser.add_argument('--splits', default='train,validation,test')
  parser.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  parser.add_argument('--out', default=None, help='default: W/features/<task>/step_<N>')
  parser.add_argument('--max_examples', type=int, default=0,
                      help='only the first N examples of each split (0: all)')
  parser.add_argument('--batch_size', type=int, default=0, help="default: the run's")
  parser.add_argument('--no_progress', action='store_true', help='no progress bars')
  args = parser.parse_args(argv)
  paths = run(args.workdir, args.task, args.layers, args.pooling,
              [s for s in args.splits.split(',') if s], step=args.step, out=args.out,
              max_examples=args.max_examples, batch_size=args.batch_size,
              progress=not args.no_progress)
  for path in paths.values():
    print(describe(path))


if __name__ == '__main__':
  main()
