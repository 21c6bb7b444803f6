"""Orbax checkpoints of a run: train state, data-iterator position and config, together.

One `CheckpointManager` per workdir keeps the last N steps. Saves are asynchronous (training
goes on while arrays are written) and a step is only listed once Orbax has committed it, so
a crash mid-save never leaves a checkpoint that looks complete.
"""

from collections.abc import Mapping
import json
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  handlers = {
      'state': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, config: Mapping[str, Any]):
  """Writes the step (asynchronously); `mngr.wait_until_finished()` waits for it."""
  items = {
      'state': ocp.args.StandardSave(state),
      'config': ocp.args.JsonSave(dict(config)),
  }
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


class _IteratorSnapshot:
  """The iterator's position taken now: an async save must not see later batches."""

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state(), indent=2).encode()

  def get_state(self) -> bytes:
    return self._state


def _shape_tree(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape)
          for path, leaf in flat if hasattr(leaf, 'shape')}


def mismatched_parameters(saved_params, expected_params) -> list[str]:
  """Human-readable differences between a checkpoint's parameters and the model's."""
  saved, expected = _shape_tree(saved_params), _shape_tree(expected_params)
  problems = []
  for name in sorted(saved.keys() | expected.keys()):
    if name not in expected:
      problems.append(f'{name}: in the checkpoint {saved[name]}, not in the model')
    elif name not in saved:
      problems.append(f'{name}: in the model {expected[name]}, not in the checkpoint')
    elif saved[name] != expected[name]:
      problems.append(f'{name}: checkpoint {saved[name]} vs model {expected[name]}')
  return problems


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model."""


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, state_shardings,
            data_iterator=None):
  """Restores `step` onto the given shardings (any mesh); also rewinds `data_iterator`."""
  saved = mngr.item_metadata(step)['state']
  problems = mismatched_parameters(saved['params'], abstract_state.params)
  if problems:
    raise IncompatibleCheckpointError(
        f'{mngr.directory} step {step} holds a checkpoint of a different model; '
        f'{len(problems)} parameter(s) differ:\n  ' + '\n  '.join(problems[:20]) +
        '\nUse a new --workdir, or the config the checkpoint was written with.')
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, state_shardings)
  items = {'state': ocp.args.StandardRestore(target)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored['state']


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, state_shardings,
                   data_iterator=None):
  """(state, step) from the newest checkpoint that restores, or (None, None) if none exists.

  A damaged checkpoint (a truncated or unreadable array file) is reported and moved aside to
  `<step>.damaged-<time>`, so it is neither retried nor in the way of the step being saved again;
  the next older one is tried. A checkpoint of a different model is not damage: that error
  propagates.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore(mngr, step, abstract_state, state_shardings, data_iterator), step
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any read failure means damage)
      quarantine(mngr, step, e)
  return None, None


def quarantine(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  source = os.path.join(str(mngr.directory), str(step))
  target = f'{source}.damaged-{int(time.time())}'
  if jax.process_index() == 0 and os.path.exists(source):
    os.replace(source, target)
  print(f'checkpoint {source} is damaged ({type(error).__name__}: {str(error)[:300]}); '
        f'moved it to {target} and falling back to an older one', flush=True)
  mngr.reload()


def restore_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def write_json(path: str, obj) -> None:
  """Writes JSON atomically: readers never see a half-written file."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
