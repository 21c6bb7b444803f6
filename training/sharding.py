"""The device mesh and the map from logical axis names to it.

Parameters and activations name their dims with one small vocabulary (batch, length, embed,
mlp, heads, kv, vocab); `config.logical_axis_rules` says which mesh axis each name is split
over. Changing the parallelism of a run is a config change, never a model change.
"""

from collections.abc import Mapping, Sequence
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves a single -1 in `config.mesh.shape` to the devices left over."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh.shape={shape}: at most one dimension may be -1')
  known = math.prod(s for s in shape if s != -1)
  if known <= 0 or num_devices % known:
    raise ValueError(f'config.mesh.shape={shape} does not divide the {num_devices} devices')
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh.shape={shape} uses {math.prod(shape)} devices '
                     f'but {num_devices} are present')
  return shape


def make_mesh(shape: Sequence[int], axes: Sequence[str]) -> Mesh:
  if len(shape) != len(axes):
    raise ValueError(f'config.mesh.shape={tuple(shape)} and config.mesh.axes={tuple(axes)} '
                     'must have the same length')
  devices = jax.devices()
  resolved = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(resolved), tuple(axes))


def logical_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  check_divisible(abstract_tree, mesh.shape, rules)
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, mesh_sizes: Mapping[str, int], rules: Rules) -> None:
  """Raises a ValueError naming the first array whose dims the mesh cannot split evenly.

  Without it, a mesh axis that does not divide e.g. the number of heads fails deep inside
  jit with a message about shapes only; this one names the array, its logical axis, the
  rule that maps it and the config fields to change.
  """
  is_spec = lambda x: isinstance(x, P)
  logical = nn.get_partition_spec(abstract_tree)
  physical = nn.logical_to_mesh(logical, rules)
  shapes = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_tree))[0]
  for (path, leaf), names, axes in zip(shapes, jax.tree.leaves(logical, is_leaf=is_spec),
                                       jax.tree.leaves(physical, is_leaf=is_spec)):
    for dim, (name, mesh_axes) in enumerate(zip(names, axes)):
      if mesh_axes is None:
        continue
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      ways = math.prod(mesh_sizes[a] for a in mesh_axes)
      if leaf.shape[dim] % ways:
        split = ' x '.join(f"'{a}' ({mesh_sizes[a]})" for a in mesh_axes)
        raise ValueError(
            f'{jax.tree_util.keystr(path, simple=True, separator="/")} has {leaf.shape[dim]} '
            f"entries along its logical axis '{name}', which config.logical_axis_rules "
            f'split over mesh axis {split}: {ways} ways does not divide {leaf.shape[dim]}. '
            f"Change config.mesh.shape, or map '{name}' to other mesh axes (or None) in "
            'config.logical_axis_rules, or resize the model (e.g. config.model.num_heads).')


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Every feature of a batch is split along its rows, over the mesh axes 'batch' maps to.

  Only the leading axis is named, so the one sharding fits features of any rank: [batch,
  length] tokens as well as [batch] labels. Inside the model, activations are constrained
  to ('batch', 'length', ...) as the rules say.
  """
  return nn.logical_to_mesh_sharding(P('batch'), mesh, rules)


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split: the global batch must be a multiple."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if spec else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding):
  """Assembles each host's rows into one global jax.Array per feature."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
