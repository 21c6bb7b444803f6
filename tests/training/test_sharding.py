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
