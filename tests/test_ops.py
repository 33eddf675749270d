"""The shared numeric helpers: L2 normalisation, rounding, exact top-k."""

import jax.numpy as jnp
import numpy as np

from search_r3_jax.core import ops


def test_l2_normalize_numpy_and_jax_agree_and_keep_zero_rows():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
  got = ops.l2_normalize(x)
  assert isinstance(got, np.ndarray)
  np.testing.assert_allclose(
      got, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(ops.l2_normalize(jnp.asarray(x))), got, rtol=1e-6
  )


def test_round_up_and_pow2_bucket():
  assert [ops.round_up(n, 32) for n in (0, 1, 32, 33)] == [32, 32, 32, 64]
  assert [ops.pow2_bucket(n, 16) for n in (1, 2, 3, 9, 40)] == [1, 2, 4, 16, 16]


def test_exact_top_k_skips_dead_rows_and_breaks_ties_by_index():
  d = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], np.float32)
  q = np.array([[1.0, 0.0]], np.float32)
  s, i = ops.exact_top_k(q, d, 3)
  assert i.tolist() == [[0, 1, 3]]
  alive = jnp.asarray([False, True, True, True])
  s, i = ops.exact_top_k(q, jnp.asarray(d), 3, alive=alive)
  assert i.tolist() == [[1, 3, 2]]
  assert s.dtype == np.float32 and i.dtype == np.int64
