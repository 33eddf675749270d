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
size and a digest of its ids, the engine); `ShardedEnvironment` saves its
blocks the same way; `load` refuses a manifest whose
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
      every = distributed.gather(padded)
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
    all_s = distributed.gather(s_pad).transpose(1, 0, 2).reshape(q, -1)
    all_r = distributed.gather(r_pad).transpose(1, 0, 2).reshape(q, -1)
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
    distributed.together(
        lambda: self.local.save(
            os.path.join(path, shard_dir(self.shard, self.shards))
        ),
        "write its shard",
    )
    distributed.together(
        lambda: self.shard == 0
        and _write_manifest(
            path,
            "sharded_index",
            self.shards,
            self.ids,
            engine=self.local.engine,
            dim=self.dim,
        ),
        "write the manifest",
    )

  @classmethod
  def load(cls, path: str | os.PathLike, ids: Sequence[str]) -> "ShardedIndex":
    """This process's shard of a saved index over the corpus `ids`.

    Raises:
      IndexInputError: no manifest, or one made for another number of
        shards or another corpus (both named).
    """
    path = os.fspath(path)
    ids = list(ids)
    _check_manifest(path, "sharded_index", ids)
    n = jax.process_count()
    local = VectorIndex.load(
        os.path.join(path, shard_dir(jax.process_index(), n))
    )
    return cls(ids, local)


# ------------------------------------------------------------- environment


class ShardedEnvironment:
  """The stage-2 environment of a pod, one block of the corpus per process.

  Each process runs a `RetrievalEnvironment` over its block: it encodes it,
  partitions it into its own regions, links each of its documents to its
  nearest neighbours within the block, samples its own drift probes and
  re-encodes what drifted or was touched there. What a step needs of the
  whole corpus is collective, and the same on every process: `search`
  (every process gives the same queries; the blocks' top-k lists are
  merged), `embeddings` (each block gives the vectors it owns), `observe`
  (each block marks its own documents) and `maybe_refresh` (each block
  refreshes itself; the report adds the blocks up). `encode` must be a
  per-process encoder (`document_encoder(..., per_process=True)`).

  On one process it is one block: a `RetrievalEnvironment` over the whole
  corpus behind the same interface.
  """

  def __init__(
      self,
      corpus,
      encode: Optional[EncodeFn] = None,
      cfg=None,
      step: int = 0,
      *,
      vectors: Optional[np.ndarray] = None,
      local=None,
  ):
    """Builds this process's block from `corpus` ({id: text}, the whole
    corpus, the same on every process) with `encode`, or from `vectors`
    (one per document of the whole corpus; each process keeps its rows).
    `local` (an already built block) is for `load`."""
    from search_r3_jax.retrieval.environment import RetrievalEnvironment

    self.doc_ids = list(corpus)
    self.texts = [corpus[d] for d in self.doc_ids]
    self.shard, self.shards = jax.process_index(), jax.process_count()
    self.rows = shard_rows(len(self.doc_ids), self.shards, self.shard)
    if len(self.doc_ids) < self.shards:
      raise ValueError(
          f"a corpus of {len(self.doc_ids)} documents cannot be split over "
          f"{self.shards} processes"
      )
    if local is None:
      block = {d: corpus[d] for d in self.doc_ids[self.rows]}
      local = RetrievalEnvironment(
          block,
          None if vectors is not None else encode,
          cfg,
          step,
          vectors=None if vectors is None else np.asarray(vectors)[self.rows],
      )
    self.local = local
    self._owned = set(self.doc_ids[self.rows])

  # -- what the stage reads ------------------------------------------------

  @property
  def cfg(self):
    return self.local.cfg

  @cfg.setter
  def cfg(self, value):
    self.local.cfg = value

  @property
  def size(self) -> int:
    return len(self.doc_ids)

  @property
  def step(self) -> int:
    return self.local.step

  def _index(self) -> ShardedIndex:
    return ShardedIndex(self.doc_ids, self.local.index, self.shard, self.shards)

  def search(
      self,
      queries: np.ndarray,
      k: Optional[int] = None,
      per_process: bool = False,
  ) -> SearchResult:
    """The merged top-k (default `cfg.k`) of the same queries on every
    process, or with `per_process` of each process's own (their numbers
    may differ). A collective."""
    k = self.cfg.k if k is None else k
    return self._index().search(queries, k, per_process=per_process)

  def embeddings(
      self, ids: Sequence[str], per_process: bool = False
  ) -> np.ndarray:
    """Stored vectors of documents of any block: of the same ids on every
    process, or with `per_process` of each process's own. A collective."""
    ids = list(ids)
    if per_process and jax.process_count() > 1:
      asked = distributed.allgather(ids)
      every = self.embeddings([d for part in asked for d in part])
      start = sum(len(part) for part in asked[: jax.process_index()])
      return every[start : start + len(ids)]
    every = set(self.doc_ids)
    unknown = [d for d in ids if d not in every]
    if unknown:
      raise KeyError(f"unknown document ids {unknown[:3]}")
    # Each block sends only the rows it owns (padded to the largest
    # block's count), with their places in `ids`.
    mine = np.asarray(
        [i for i, d in enumerate(ids) if d in self._owned], np.int64
    )
    width = max(int(c) for c in distributed.allgather(len(mine)))
    dim = self.local.index.dim
    rows = np.zeros((width, dim), np.float32)
    where = np.full((width,), -1, np.int64)
    if len(mine):
      rows[: len(mine)] = self.local.embeddings([ids[i] for i in mine])
      where[: len(mine)] = mine
    all_rows, all_where = distributed.gather(rows), distributed.gather(where)
    out = np.zeros((len(ids), dim), np.float32)
    for p in range(all_rows.shape[0]):
      keep = all_where[p] >= 0
      out[all_where[p][keep]] = all_rows[p][keep]
    return out

  def observe(self, gold, retrieved=()) -> int:
    """Marks, in each block, the touched documents it owns; returns how
    many are marked over all blocks."""
    from search_r3_jax.retrieval.environment import _flatten

    every = set(self.doc_ids)
    for d in _flatten(gold) + _flatten(retrieved):
      if d not in every:
        raise KeyError(d)
    keep = lambda ids: [d for d in _flatten(ids) if d in self._owned]
    self.local.observe(keep(gold), keep(retrieved))
    marked = int(self.local.touched.sum())
    return int(sum(distributed.allgather(marked)))

  def maybe_refresh(self, step: int, encode: EncodeFn) -> Optional[dict]:
    """Every block's `maybe_refresh` (they act on the same steps); the
    report of the whole corpus: documents re-encoded and drifted regions
    added up, "full" if any block rebuilt, the drift averaged over blocks
    by size, and each block's own report under `blocks`."""
    report = self.local.maybe_refresh(step, encode)
    if report is None:
      return None
    keys = ("kind", "reencoded", "refreshed", "drifted_regions", "drift_mean")
    mine = {k: report[k] for k in keys if k in report}
    mine["size"] = self.local.size
    blocks = distributed.allgather(_plain(mine))
    total = dict(report)
    total["reencoded"] = sum(b["reencoded"] for b in blocks)
    total["refreshed"] = sum(b.get("refreshed", 0) for b in blocks)
    total["reencoded_fraction"] = total["reencoded"] / self.size
    total["drifted_regions"] = sum(b["drifted_regions"] for b in blocks)
    total["drift_mean"] = float(
        sum(b["drift_mean"] * b["size"] for b in blocks) / self.size
    )
    total["kind"] = (
        "full" if any(b["kind"] == "full" for b in blocks) else ("selective")
    )
    total["blocks"] = blocks
    return total

  # -- files -----------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Each process writes its block (`shard-<i>-of-<n>/`, an environment
    directory); process 0 then the manifest. A failure on any process
    stops every process with the same error."""
    path = os.fspath(path)
    distributed.together(
        lambda: self.local.save(
            os.path.join(path, shard_dir(self.shard, self.shards))
        ),
        "write its block",
    )
    distributed.together(
        lambda: self.shard == 0
        and _write_manifest(
            path, "sharded_environment", self.shards, self.doc_ids
        ),
        "write the manifest",
    )

  @classmethod
  def load(cls, path: str | os.PathLike, corpus) -> "ShardedEnvironment":
    """This process's block of a saved environment over `corpus`.

    Raises:
      IndexInputError: no manifest, or one of another shard count or
        corpus (both named).
    """
    from search_r3_jax.retrieval.environment import RetrievalEnvironment

    path = os.fspath(path)
    ids = list(corpus)
    _check_manifest(path, "sharded_environment", ids)
    rows = shard_rows(len(ids), jax.process_count(), jax.process_index())
    local = RetrievalEnvironment.load(
        os.path.join(path, shard_dir(jax.process_index(), jax.process_count())),
        {d: corpus[d] for d in ids[rows]},
    )
    return cls(corpus, local=local)


def _plain(values: dict) -> dict:
  """JSON-safe numbers of a report."""
  out = {}
  for k, v in values.items():
    out[k] = v if isinstance(v, str) else float(v)
  return out


def _write_manifest(path: str, kind: str, shards: int, ids, **extra) -> None:
  manifest = dict(
      format=kind,
      format_version=FORMAT_VERSION,
      shards=shards,
      size=len(ids),
      corpus=corpus_digest(ids),
      **extra,
  )
  tmp = os.path.join(path, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(path, MANIFEST))


def _check_manifest(path: str, kind: str, ids) -> dict:
  """The manifest at `path`, checked against this pod and `ids`."""
  mpath = os.path.join(path, MANIFEST)
  try:
    with open(mpath, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise IndexInputError(f"{mpath}: no manifest of a {kind}") from None
  except ValueError as e:
    raise IndexInputError(f"{mpath}: not JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != kind:
    raise IndexInputError(f"{mpath}: not the manifest of a {kind}")
  n = jax.process_count()
  if manifest.get("shards") != n:
    raise IndexInputError(
        f"{mpath}: saved as {manifest.get('shards')} shards, this run has "
        f"{n} processes; load it with {manifest.get('shards')}"
    )
  digest = corpus_digest(ids)
  if manifest.get("size") != len(ids) or manifest.get("corpus") != digest:
    raise IndexInputError(
        f"{mpath}: made for a corpus of {manifest.get('size')} documents "
        f"(digest {manifest.get('corpus')}), this corpus has {len(ids)} "
        f"(digest {digest})"
    )
  return manifest
