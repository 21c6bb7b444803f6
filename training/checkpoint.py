"""Orbax checkpoints of a run: train state, data-iterator position and config, together.

One `CheckpointManager` per workdir keeps the last N steps. Saves are asynchronous (training
goes on while arrays are written) and a step is only listed once Orbax has committed it, so
a crash mid-save never leaves a checkpoint that looks complete. Each step also stores a
checksum per array (`integrity`), checked on restore: tensorstore would restore an altered
byte silently.
"""

from collections.abc import Mapping
import json
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int = 3, async_save: bool = True,
            writer: bool = False) -> ocp.CheckpointManager:
  """The run's checkpoints; the `writer` (the training run) removes saves a crash left unfinished.

  Readers (eval.py) must not: a `<step>.orbax-checkpoint-tmp` directory may be a save in progress.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=writer)
  handlers = {
      'state': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
      'integrity': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, config: Mapping[str, Any]):
  """Writes the step (asynchronously); `mngr.wait_until_finished()` waits for it."""
  items = {
      'state': ocp.args.StandardSave(state),
      'config': ocp.args.JsonSave(dict(config)),
      'integrity': ocp.args.JsonSave(fingerprint(state)),
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


def _leaf_sum(x: jax.Array) -> jax.Array:
  """The sum of a leaf's bit patterns as unsigned integers, modulo 2**32.

  Any change to the bytes of a single element changes it by d * 2**(8k) with 0 < |d| < 256
  and 8k + 8 <= 32, never a multiple of 2**32: so one altered byte (or element) is always
  caught, for one cheap pass over memory on device.
  """
  if x.dtype.itemsize == 8:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


_leaf_sums = jax.jit(lambda tree: jax.tree.map(_leaf_sum, tree))


def fingerprint(state) -> dict[str, int]:
  """{leaf path: checksum} of a train state, saved beside it and checked on restore.

  tensorstore keeps no checksum of the array chunks: a flipped byte restores silently as a
  different number. The sums are computed on device; only one integer per leaf is fetched.
  """
  arrays = {k: v for k, v in _flat(state).items() if hasattr(v, 'dtype')}
  return {k: int(v) for k, v in jax.device_get(_leaf_sums(arrays)).items()}


def _flat(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf for path, leaf in flat}


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


class DamagedCheckpointError(IOError):
  """A checkpoint's files do not read back as what was saved (truncated, altered, missing)."""


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, state_shardings,
            data_iterator=None):
  """Restores `step` onto the given shardings (any mesh); also rewinds `data_iterator`.

  Raises IncompatibleCheckpointError for another model's checkpoint and
  DamagedCheckpointError when its files cannot be read or fail their checksums.
  """
  where = os.path.join(str(mngr.directory), str(step))
  try:
    saved = mngr.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except  (unreadable metadata is damage)
    raise DamagedCheckpointError(f'checkpoint {where} is damaged: {_describe(e)}') from e
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
  # Checkpoints written before checksums existed have no integrity item.
  checked = os.path.isdir(os.path.join(where, 'integrity'))
  if checked:
    items['integrity'] = ocp.args.JsonRestore()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except  (any read failure means damage)
    raise DamagedCheckpointError(f'checkpoint {where} is damaged: {_describe(e)}') from e
  if checked:
    actual = fingerprint(restored['state'])
    bad = sorted(k for k, v in restored['integrity'].items() if actual.get(k) != v)
    if bad:
      raise DamagedCheckpointError(
          f'checkpoint {where} is damaged: {len(bad)} array(s) fail their checksum '
          f'({", ".join(bad[:5])}{", ..." if len(bad) > 5 else ""})')
  return restored['state']


def _describe(error: Exception) -> str:
  return f'{type(error).__name__}: {str(error)[:300]}'


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, state_shardings,
                   data_iterator=None, *, move_damaged: bool = True):
  """(state, step) from the newest checkpoint that restores, or (None, None) if none exists.

  A damaged checkpoint (a truncated, altered or unreadable array file) is reported and the
  next older one is tried. With `move_damaged` (the training run, the workdir's only writer)
  it is also moved aside to `<step>.damaged-<time>`, so it is neither retried nor in the way
  of the step being saved again; readers such as eval.py leave it where it is. A checkpoint
  of a different model is not damage: that error propagates.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore(mngr, step, abstract_state, state_shardings, data_iterator), step
    except DamagedCheckpointError as e:
      if move_damaged:
        quarantine(mngr, step, e)
      else:
        print(f'{e}; skipping it and trying an older one', flush=True)
  return None, None


def quarantine(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  source = os.path.join(str(mngr.directory), str(step))
  target = f'{source}.damaged-{int(time.time())}'
  if jax.process_index() == 0 and os.path.exists(source):
    os.replace(source, target)
  print(f'{error}; moved it to {target} and falling back to an older one', flush=True)
  mngr.reload()


def restore_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def read_json(path: str):
  """A JSON file, or an error naming it."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path} does not exist') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON (line {e.lineno}: {e.msg})') from None


def write_json(path: str, obj) -> None:
  """Writes JSON atomically: readers never see a half-written file."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
