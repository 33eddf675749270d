"""Regions of the embedding space: spherical k-means on the device, and the
nearest centroid of new vectors on the host. The environment groups its
documents into these regions to measure drift region by region."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from search_r3_jax.core.ops import l2_normalize


@functools.partial(jax.jit, static_argnames=("iters",))
def _spherical_kmeans(x, centroids, iters: int):
  """Lloyd iterations on unit vectors; empty clusters keep their centroid."""
  k = centroids.shape[0]

  def body(_, c):
    assign = jnp.argmax(x @ c.T, axis=1)
    sums = jax.ops.segment_sum(x, assign, k)
    counts = jax.ops.segment_sum(jnp.ones_like(assign, x.dtype), assign, k)
    new = jnp.where(counts[:, None] > 0, sums, c)
    return l2_normalize(new)

  c = jax.lax.fori_loop(0, iters, body, centroids)
  return c, jnp.argmax(x @ c.T, axis=1)


def kmeans(
    x: np.ndarray, k: int, iters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Spherical k-means of unit rows `x`: (centroids [k, D], assignment [N])."""
  rng = np.random.default_rng(seed)
  k = max(1, min(k, x.shape[0]))
  init = x[np.sort(rng.choice(x.shape[0], k, replace=False))]
  c, a = _spherical_kmeans(jnp.asarray(x), jnp.asarray(init), iters)
  return np.asarray(c), np.asarray(a, np.int64)


def nearest_region(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """Region of each row of `x` (host numpy: R x D is small, and a jitted
  version would compile for every refresh's row count)."""
  return np.argmax(x @ centroids.T, axis=1).astype(np.int64)
