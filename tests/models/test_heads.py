"""Pooling over real tokens (models/heads.py): hand-computed values, padding never leaks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import heads
from tests.tolerances import assert_close

# Two rows of 4 tokens, D = 2. Row 0 has 3 real tokens, row 1 has 2; padding holds values
# far larger than any real one (and nan/inf below), so a leak would show.
HIDDEN = np.array([[[1., -2.], [3., 4.], [-5., 6.], [100., 100.]],
                   [[2., 8.], [-4., -1.], [50., -50.], [70., 70.]]], np.float32)
SEGMENTS = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)


def test_mean_by_hand():
  expected = [[(1 + 3 - 5) / 3, (-2 + 4 + 6) / 3], [(2 - 4) / 2, (8 - 1) / 2]]
  assert_close(heads.pool_mean(HIDDEN, SEGMENTS), np.array(expected, np.float32))


def test_max_by_hand():
  np.testing.assert_array_equal(heads.pool_max(HIDDEN, SEGMENTS), [[3., 6.], [2., 8.]])


def test_cls_is_position_zero():
  np.testing.assert_array_equal(heads.pool_cls(HIDDEN, SEGMENTS), HIDDEN[:, 0])
  np.testing.assert_array_equal(heads.pool_cls(HIDDEN), HIDDEN[:, 0])


@pytest.mark.parametrize('name', ['mean', 'max'])
@pytest.mark.parametrize('poison', [1e6, -1e6, np.nan, np.inf, -np.inf])
def test_padding_never_leaks(name, poison):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 6, 5)).astype(np.float32)
  segments = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], np.int32)
  poisoned = np.where(segments[..., None] == 0, np.float32(poison), hidden)
  clean = heads.POOLINGS[name](hidden, segments)
  np.testing.assert_array_equal(heads.POOLINGS[name](poisoned, segments), clean)
  # And the result is the pooling of the real tokens alone, row by row.
  reduce = {'mean': np.mean, 'max': np.max}[name]
  for b in range(3):
    real = hidden[b, segments[b] != 0]
    assert_close(clean[b], reduce(real, axis=0))


def test_packed_segment_ids_count_as_real():
  # Any non-zero id is a real token (packed rows number their sequences 1, 2, ...).
  segments = np.array([[1, 2, 2, 0], [3, 3, 0, 0]], np.int32)
  assert_close(heads.pool_mean(HIDDEN, segments),
               np.array([[-1 / 3, 8 / 3], [-1., 3.5]], np.float32))


def test_rows_without_real_tokens_pool_to_zero():
  segments = np.zeros((2, 4), np.int32)
  for name in ('mean', 'max'):
    out = heads.POOLINGS[name](HIDDEN, segments)
    np.testing.assert_array_equal(out, np.zeros((2, 2), np.float32))


def test_dtype_kept_and_jit_agrees():
  hidden = jnp.asarray(HIDDEN, jnp.bfloat16)
  for name, fn in heads.POOLINGS.items():
    assert fn(hidden, SEGMENTS).dtype == jnp.bfloat16, name
    eager = fn(HIDDEN, SEGMENTS)
    assert_close(jax.jit(fn)(HIDDEN, SEGMENTS), eager)


def test_pool_by_name():
  assert set(heads.POOLINGS) == {'cls', 'mean', 'max'}
  np.testing.assert_array_equal(heads.pool('max', HIDDEN, SEGMENTS), [[3., 6.], [2., 8.]])
  with pytest.raises(ValueError, match='known: cls, max, mean'):
    heads.pool('median', HIDDEN, SEGMENTS)
