"""A corpus index split over the processes of a pod: each process owns one
contiguous block of the corpus, encodes it, indexes it and refreshes it.

    index = ShardedIndex.build(ids, texts, encode, step=0, engine="exact")
    found = index.search(my_queries, k=10)   # every process, its own queries

A search is a collective. The queries of every process are all-gathered,
every process searches its shard for all of them, and the per-shard top-k
lists (scores and global rows, `shards x queries x k`) are all-gathered and
merged, best score first and, between equal scores, the lower corpus row
first: on the exact engine the merged list is the one a single index over
the whole corpus gives. Each process gets back the results of the queries it
gave (or, with `per_process=False`, where every process gives the same
queries, all of them).

Every process knows the corpus ids (strings: small beside the vectors);
vectors live only with the shard that owns them. `encode` is a per-process
encoder (`Policy.encode_documents(..., per_process=True)`): each process
gives its own texts, the call is collective.

`save(path)` writes one directory per shard (`shard-00000-of-00002/`, a
`VectorIndex`) and a manifest (`manifest.json`: the shard count, the corpus
size and a digest of its ids, the engine); `load` refuses a manifest whose
shard count is not the pod's, or whose corpus is not the one given, naming
both.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from search_r3_jax.core import distributed
from search_r3_jax.retrieval.index import IndexInputError
from search_r3_jax.retrieval.index import SearchResult
from search_r3_jax.retrieval.index import VectorIndex

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

EncodeFn = Callable[[Sequence[str]], np.ndarray]


def shard_rows(n: int, shards: int, shard: int) -> slice:
  """The corpus rows shard `shard` of `shards` owns: one contiguous block,
  the blocks differing in size by at most one."""
  return slice(shard * n // shards, (shard + 1) * n // shards)


def corpus_digest(ids: Sequence[str]) -> str:
  h = hashlib.sha256()
  for d in ids:
    h.update(d.encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()[:16]


def shard_dir(shard: int, shards: int) -> str:
  return f"shard-{shard:05d}-of-{shards:05d}"


def _gather(x: np.ndarray) -> np.ndarray:
  """[P, ...] of every process's equally shaped `x`."""
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x))


class ShardedIndex:
  """This process's shard of a corpus index, and the collective search over
  all shards."""

  def __init__(
      self,
      ids: Sequence[str],
      local: VectorIndex,
      shard: Optional[int] = None,
      shards: Optional[int] = None,
  ):
    self.ids = list(ids)
    self.shard = jax.process_index() if shard is None else shard
    self.shards = jax.process_count() if shards is None else shards
    self.rows = shard_rows(len(self.ids), self.shards, self.shard)
    own = self.ids[self.rows]
    if local.ids != own:
      raise IndexInputError(
          f"shard {self.shard} of {self.shards} holds {len(local.ids)} "
          f"documents, not the {len(own)} of corpus rows "
          f"{self.rows.start}..{self.rows.stop - 1}"
      )
    self.local = local

  @property
  def dim(self) -> int:
    return self.local.dim

  def owned(self) -> list[str]:
    """The ids this process's shard holds, in corpus order."""
    return self.ids[self.rows]

  def __len__(self) -> int:
    return len(self.ids)

  @classmethod
  def build(
      cls,
      ids: Sequence[str],
      texts: Sequence[str],
      encode: EncodeFn,
      step: int = 0,
      *,
      engine: str = "exact",
      k: int = 10,
  ) -> "ShardedIndex":
    """Each process encodes and indexes its block of the corpus (`texts`
    and `ids` are the whole corpus, in the same order on every process)."""
    ids = list(ids)
    if len(ids) != len(texts):
      raise IndexInputError(
          f"{len(ids)} ids but {len(texts)} texts for the sharded index"
      )
    if len(ids) < jax.process_count():
      raise IndexInputError(
          f"a corpus of {len(ids)} documents cannot be split over "
          f"{jax.process_count()} processes"
      )
    rows = shard_rows(len(ids), jax.process_count(), jax.process_index())
    vectors = np.asarray(encode(list(texts[rows])), np.float32)
    local = VectorIndex.build(ids[rows], vectors, step, engine=engine, k=k)
    return cls(ids, local)

  # -- search ----------------------------------------------------------------

  def search(
      self, queries: np.ndarray, k: int = 10, per_process: bool = True
  ) -> SearchResult:
    """The global top-`k` of each query over every shard.

    Args:
      queries: [Q, D]; with `per_process` each process's own (their numbers
        may differ), else the same on every process.
    Returns:
      the results of this process's queries (all of them without
      `per_process`), rows being corpus rows.
    """
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise IndexInputError(
          f"search: queries must be [Q, {self.dim}], got {queries.shape}"
      )
    if k < 1:
      raise IndexInputError(f"search: k must be >= 1, got {k}")
    n = jax.process_count()
    if per_process and n > 1:
      counts = [int(c) for c in distributed.allgather(len(queries))]
      width = max(counts)
      padded = np.zeros((width, self.dim), np.float32)
      padded[: len(queries)] = queries
      every = _gather(padded)
      everyone = np.concatenate([every[p, : counts[p]] for p in range(n)])
      mine = slice(sum(counts[: self.shard]), sum(counts[: self.shard + 1]))
    else:
      everyone, mine = queries, slice(0, len(queries))
    q = len(everyone)
    kk = min(k, len(self.local))
    if q:
      found = self.local.search(everyone, kk)
      scores = found.scores[:, :kk]
      rows = np.where(
          found.rows[:, :kk] >= 0, found.rows[:, :kk] + self.rows.start, -1
      )
    else:
      scores = np.zeros((0, kk), np.float32)
      rows = np.zeros((0, kk), np.int64)
    # Shards with fewer documents than k pad to a common width.
    width = int(max(distributed.allgather(kk))) if n > 1 else kk
    s_pad = np.full((q, width), -np.inf, np.float32)
    r_pad = np.full((q, width), -1, np.int64)
    s_pad[:, :kk], r_pad[:, :kk] = scores, rows
    all_s = _gather(s_pad).transpose(1, 0, 2).reshape(q, -1)
    all_r = _gather(r_pad).transpose(1, 0, 2).reshape(q, -1)
    # Best score first; between equal scores the lower corpus row, as one
    # index over the whole corpus orders them. Missing hits go last.
    key_row = np.where(all_r >= 0, all_r, np.iinfo(np.int64).max)
    order = np.lexsort((key_row, -all_s), axis=-1)[:, :k]
    out_s = np.take_along_axis(all_s, order, axis=1)
    out_r = np.take_along_axis(all_r, order, axis=1)
    if out_s.shape[1] < k:
      extra = k - out_s.shape[1]
      out_s = np.pad(out_s, ((0, 0), (0, extra)), constant_values=-np.inf)
      out_r = np.pad(out_r, ((0, 0), (0, extra)), constant_values=-1)
    out_s, out_r = out_s[mine], out_r[mine]
    ids = [[self.ids[j] for j in row if j >= 0] for row in out_r]
    return SearchResult(out_s.astype(np.float32), out_r, ids)

  # -- refresh ---------------------------------------------------------------

  def refresh(
      self,
      ids: Sequence[str],
      texts: Sequence[str],
      encode: EncodeFn,
      step: int,
  ) -> int:
    """Re-encodes, of `ids` (the same on every process, with their
    `texts`), those this shard owns, and stores them as of `step`. A
    collective (the encoder is). Returns how many this process encoded."""
    if len(ids) != len(texts):
      raise IndexInputError(f"refresh: {len(ids)} ids but {len(texts)} texts")
    own = set(self.owned())
    picked = [(d, t) for d, t in zip(ids, texts) if d in own]
    vectors = np.asarray(encode([t for _, t in picked]), np.float32)
    if picked:
      self.local.upsert([d for d, _ in picked], vectors, step)
    return len(picked)

  # -- files -----------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Each process writes its shard; process 0 the manifest, after every
    shard is written."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    self.local.save(os.path.join(path, shard_dir(self.shard, self.shards)))
    distributed.barrier(f"sharded_index_save_{path}")
    if self.shard == 0:
      manifest = dict(
          format="sharded_index",
          version=FORMAT_VERSION,
          shards=self.shards,
          size=len(self.ids),
          corpus=corpus_digest(self.ids),
          engine=self.local.engine,
          dim=self.dim,
      )
      tmp = os.path.join(path, MANIFEST + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, os.path.join(path, MANIFEST))
    distributed.barrier(f"sharded_index_manifest_{path}")

  @classmethod
  def load(cls, path: str | os.PathLike, ids: Sequence[str]) -> "ShardedIndex":
    """This process's shard of a saved index over the corpus `ids`.

    Raises:
      IndexInputError: no manifest, or one made for another number of
        shards or another corpus (both named).
    """
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    try:
      with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    except FileNotFoundError:
      raise IndexInputError(
          f"{mpath}: no manifest of a sharded index"
      ) from None
    except ValueError as e:
      raise IndexInputError(f"{mpath}: not JSON ({e})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "sharded_index"
    ):
      raise IndexInputError(f"{mpath}: not the manifest of a sharded index")
    n = jax.process_count()
    if manifest.get("shards") != n:
      raise IndexInputError(
          f"{mpath}: saved as {manifest.get('shards')} shards, this run has "
          f"{n} processes; load it with {manifest.get('shards')}"
      )
    ids = list(ids)
    digest = corpus_digest(ids)
    if manifest.get("size") != len(ids) or manifest.get("corpus") != digest:
      raise IndexInputError(
          f"{mpath}: made for a corpus of {manifest.get('size')} documents "
          f"(digest {manifest.get('corpus')}), this corpus has {len(ids)} "
          f"(digest {digest})"
      )
    local = VectorIndex.load(
        os.path.join(path, shard_dir(jax.process_index(), n))
    )
    return cls(ids, local)
