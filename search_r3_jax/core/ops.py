"""Small numeric helpers that every layer shares: one L2 normalisation, one
rounding rule for padded sizes and one exact top-k search."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Below this norm a vector is treated as zero (it stays zero, not NaN).
_EPS = 1e-12


def l2_normalize(x, axis: int = -1, eps: float = _EPS):
  """`x` divided by its L2 norm along `axis`; numpy in, numpy out, and the
  same for jax arrays (also inside jit)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  norm = xp.linalg.norm(x, axis=axis, keepdims=True)
  return x / xp.maximum(norm, eps)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n, and at least
  `multiple` itself (a padded size is never 0)."""
  return max(multiple, -(-int(n) // multiple) * multiple)


def pow2_bucket(n: int, cap: int) -> int:
  """n rounded up to a power of two, at most `cap`: ragged batches reuse a
  few compiled shapes instead of compiling one each."""
  return min(cap, 1 << max(int(n) - 1, 0).bit_length())


@jax.jit
def _scores(q, d, alive):
  # HIGHEST: exact search is the ground truth and must not run in TF32 or
  # bf16 on accelerators.
  s = jnp.matmul(q, d.T, precision=jax.lax.Precision.HIGHEST)
  return s if alive is None else jnp.where(alive[None, :], s, -jnp.inf)


@functools.partial(jax.jit, static_argnums=1)
def _top_k(scores, k):
  return jax.lax.top_k(scores, k)


def exact_top_k(
    queries: np.ndarray,
    docs,
    k: int,
    *,
    alive: Optional[jax.Array] = None,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact maximum inner product search (cosine for unit vectors), jitted.

  Args:
    queries: [Q, D] host array.
    docs: [N, D] (host or device; pass a device array to keep it there
      between calls).
    k: results per query, at most N.
    alive: optional [N] bool device mask; dead rows never rank.
    chunk: queries per device call (rows are padded to a power of two).
  Returns:
    (scores [Q, k] float32, indices [Q, k] int64), best first; ties keep
    the lower index first (`lax.top_k`).
  """
  docs = jnp.asarray(docs, jnp.float32)
  k = min(int(k), docs.shape[0])
  queries = np.asarray(queries, np.float32)
  out_s, out_i = [], []
  for s in range(0, queries.shape[0], chunk):
    part = queries[s : s + chunk]
    padded = np.zeros(
        (pow2_bucket(len(part), chunk), docs.shape[1]), np.float32
    )
    padded[: len(part)] = part
    v, i = _top_k(_scores(jnp.asarray(padded), docs, alive), k)
    out_s.append(np.asarray(v)[: len(part)])
    out_i.append(np.asarray(i, np.int64)[: len(part)])
  if not out_s:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  return np.concatenate(out_s), np.concatenate(out_i)
