"""Comparisons whose tolerance scales with the tensors compared, never a bare tiny atol.

Float32 results that a different reduction order computes (another kernel, more devices,
another machine's thread count) differ by a few ulps of the largest terms summed; an element
that is a difference of large terms keeps that absolute error (seen on CI: 1.8e-8, rel
2.4e-5, failing atol=1e-8). So the absolute tolerance is a fraction of the largest magnitude.
"""

import jax
import numpy as np


def largest(tree) -> float:
  return max((float(np.abs(np.asarray(x, np.float64)).max(initial=0))
              for x in jax.tree.leaves(tree)), default=0.0)


def assert_close(actual, expected, rtol: float = 1e-5, scale: float = 1e-5) -> None:
  """allclose with atol = `scale` x the largest magnitude of `expected`."""
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=scale * largest(expected))


def assert_trees_close(actual, expected, rtol: float = 1e-5, scale: float = 1e-5) -> None:
  """`assert_close` leaf by leaf, with the whole tree's largest magnitude.

  The tree's, not each leaf's: a leaf that is 0 in exact arithmetic (the gradient of the
  attention key's bias) holds only rounding noise of the other leaves' size.
  """
  atol = scale * largest(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               actual, expected)
