import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from training import sharding


@pytest.mark.parametrize('shape, devices, expected', [
    ((-1,), 8, (8,)),
    ((2, -1), 8, (2, 4)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((1, -1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_minus_one(shape, devices, expected):
  assert sharding.mesh_shape(shape, devices) == expected


@pytest.mark.parametrize('shape, devices, message', [
    ((3, -1), 8, 'does not divide the 8 devices'),
    ((-1, -1), 8, 'at most one dimension may be -1'),
    ((2, 2), 8, 'uses 4 devices but 8 are present'),
])
def test_bad_mesh_shapes_name_the_field(shape, devices, message):
  with pytest.raises(ValueError, match='config.mesh.shape') as e:
    sharding.mesh_shape(shape, devices)
  assert message in str(e.value)


def _boxed(shape, names):
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


RULES = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('heads', 'tensor'), ('kv', None))


def test_a_mesh_that_splits_every_dim_evenly_passes():
  tree = {'query': {'kernel': _boxed((32, 8, 4), ('embed', 'heads', 'kv'))}}
  sharding.check_divisible(tree, {'data': 1, 'fsdp': 2, 'tensor': 8}, RULES)


def test_tensor_parallelism_not_dividing_the_heads_names_the_parameter_and_the_rule():
  tree = {'block_0': {'query': {'kernel': _boxed((32, 2, 16), ('embed', 'heads', 'kv'))}}}
  with pytest.raises(ValueError) as e:
    sharding.check_divisible(tree, {'data': 1, 'fsdp': 1, 'tensor': 8}, RULES)
  message = str(e.value)
  assert message.startswith('block_0/query/kernel has 2 entries along its logical axis '
                            "'heads', which config.logical_axis_rules split over mesh axis "
                            "'tensor' (8): 8 ways does not divide 2.")
  assert 'config.mesh.shape' in message and 'config.model.num_heads' in message


def test_a_dim_split_over_two_mesh_axes_counts_both():
  tree = {'x': _boxed((6, 4), ('batch', 'kv'))}
  with pytest.raises(ValueError, match=r"'data' \(2\) x 'fsdp' \(2\): 4 ways does not divide 6"):
    sharding.check_divisible(tree, {'data': 2, 'fsdp': 2, 'tensor': 1}, RULES)
