"""A host index over corpus embeddings: one interface, two engines.

`VectorIndex` keeps the stored embeddings on the host (ids, vectors, the
training step that produced each vector) and answers maximum-inner-product
queries through an engine:

  * "scann": a ScaNN searcher built with the document ids, so `upsert` and
    `delete` change it in place. Its parameters come from the corpus size
    (`scann_params`): a k-means tree of about sqrt(N) leaves, asymmetric
    hashing with 2 dimensions per block, and an exact float reorder of the
    best candidates. Small corpora (under `SCANN_TREE_MIN` = 16,384 vectors)
    are scored by brute force.
  * "exact": a jitted matmul + top-k on a JAX device over the whole store;
    for small corpora and as the ground truth of the approximate engine.

Rows of the store are stable: a deleted document leaves a dead row, which
searches never return, until `compact()` or `rebuild()`. Every mutation
checks its whole input first (dimension, finite values, known and unique ids)
and raises before touching anything, so a bad call leaves the index as it
was.

`save(path)` writes the store and, for ScaNN, the searcher's own
serialization into a temporary directory next to `path` and renames it into
place, so a crash mid-save leaves the previous copy whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Optional, Sequence
import warnings

import jax.numpy as jnp
import numpy as np

from search_r3_jax.core.ops import exact_top_k

ENGINES = ("scann", "exact")
# Below this many vectors ScaNN scores by brute force: on the 10,033
# stage-1 SmolLM2 embeddings of the embedded corpus (576 dims), a tree of 100
# leaves searching 10 found only 0.83 of the exact top 10, while brute force
# over 10k vectors costs a few milliseconds per query batch.
SCANN_TREE_MIN = 16384
FORMAT_VERSION = 1
# The ScaNN searcher's document ids, as JSON (ScaNN itself pickles them).
SCANN_IDS = "scann_docids.json"


class IndexInputError(ValueError):
  """Bad input to the index (the index is left unchanged)."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Top-k of a batch of queries, best first.

  Attributes:
    scores: [Q, k] float32 inner products (-inf where fewer than k exist).
    rows: [Q, k] int64 store rows (-1 where fewer than k exist).
    ids: Q lists of document ids (only the real hits).
  """

  scores: np.ndarray
  rows: np.ndarray
  ids: list[list[str]]


def scann_params(n: int, k: int = 10, search_fraction: float = 0.1) -> dict:
  """ScaNN parameters chosen from the corpus size `n`.

  A tree of about sqrt(n) leaves searched over `search_fraction` of them (at
  least 8), asymmetric hashing (2 dims per block, anisotropic threshold 0.2)
  and an exact reorder of max(100, 10 k) candidates. Below `SCANN_TREE_MIN`
  vectors, brute force.
  """
  if n < SCANN_TREE_MIN:
    return {"kind": "brute_force", "num_neighbors": k}
  leaves = int(round(math.sqrt(n)))
  search = max(8, int(math.ceil(leaves * search_fraction)))
  return {
      "kind": "tree_ah",
      "num_neighbors": k,
      "num_leaves": leaves,
      "num_leaves_to_search": min(leaves, search),
      "training_sample_size": min(n, 100_000),
      "dims_per_block": 2,
      "anisotropic_quantization_threshold": 0.2,
      "reorder": max(100, 10 * k),
  }


def _build_scann(vectors: np.ndarray, ids: list[str], params: dict):
  import scann

  b = scann.scann_ops_pybind.builder(
      vectors, params["num_neighbors"], "dot_product"
  )
  if params["kind"] == "brute_force":
    b = b.score_brute_force()
  else:
    b = b.tree(
        num_leaves=params["num_leaves"],
        num_leaves_to_search=params["num_leaves_to_search"],
        training_sample_size=params["training_sample_size"],
    )
    b = b.score_ah(
        params["dims_per_block"],
        anisotropic_quantization_threshold=params[
            "anisotropic_quantization_threshold"
        ],
    )
    b = b.reorder(params["reorder"])
  return b.build(docids=list(ids))


class VectorIndex:
  """Stored embeddings with ids and versions, searched by an engine.

  Build with `VectorIndex.build(ids, vectors, step, engine=...)`.
  """

  def __init__(
      self, dim: int, engine: str = "scann", params: Optional[dict] = None
  ):
    if engine not in ENGINES:
      raise IndexInputError(
          f"unknown index engine {engine!r}; known: {ENGINES}"
      )
    self.dim = int(dim)
    self.engine = engine
    self.params = dict(params or {})
    self.ids: list[str] = []
    self.row_of: dict[str, int] = {}
    self.vectors = np.zeros((0, self.dim), np.float32)
    self.versions = np.zeros((0,), np.int64)
    self.alive = np.zeros((0,), bool)
    self._scann = None
    self._device_store = None  # (vectors, alive) on the device, exact engine

  # -- construction ----------------------------------------------------------

  @classmethod
  def build(
      cls,
      ids: Sequence[str],
      vectors: np.ndarray,
      step: int = 0,
      *,
      engine: str = "scann",
      k: int = 10,
      params: Optional[dict] = None,
  ) -> "VectorIndex":
    """An index over `vectors` [N, D] (N >= 1) with document `ids`.

    Args:
      step: the training step that produced the vectors (their version).
      k: the default number of neighbours (ScaNN's configured value).
      params: ScaNN parameters; default `scann_params(N, k)`.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
      raise IndexInputError(
          f"vectors must be [N, D], got shape {vectors.shape}"
      )
    index = cls(vectors.shape[1], engine)
    ids = index._check_ids(ids, vectors, "build")
    if not ids:
      raise IndexInputError("cannot build an index over an empty corpus")
    index.params = dict(params or scann_params(len(ids), k))
    index.ids = list(ids)
    index.row_of = {d: i for i, d in enumerate(index.ids)}
    # A copy: later upserts must never write into the caller's array.
    index.vectors = np.array(vectors, np.float32, order="C", copy=True)
    index.versions = np.full((len(ids),), int(step), np.int64)
    index.alive = np.ones((len(ids),), bool)
    index._rebuild_engine()
    return index

  def _rebuild_engine(self, params: Optional[dict] = None) -> None:
    """Builds the engine with `params` (default: the current ones) and
    only then replaces the old one: a failed build changes nothing."""
    params = dict(self.params if params is None else params)
    searcher = None
    if self.engine == "scann":
      rows = np.flatnonzero(self.alive)
      if rows.size == 0:
        raise IndexInputError(
            "cannot build a ScaNN index over an empty " "corpus"
        )
      try:
        searcher = _build_scann(
            self.vectors[rows], [self.ids[r] for r in rows], params
        )
      except KeyError as e:
        raise IndexInputError(f"ScaNN parameters {params} lack {e}") from None
    self.params, self._scann, self._device_store = params, searcher, None

  def rebuild(self, params: Optional[dict] = None) -> None:
    """Compacts dead rows away and rebuilds the engine (new ScaNN
    parameters from the live size unless `params` is given)."""
    self.compact()
    k = self.params.get("num_neighbors", 10)
    self._rebuild_engine(params or scann_params(len(self.ids), k))

  def compact(self) -> np.ndarray:
    """Drops dead rows. Returns the old row of each new row."""
    keep = np.flatnonzero(self.alive)
    if keep.size == len(self.ids):
      return keep
    self.ids = [self.ids[r] for r in keep]
    self.row_of = {d: i for i, d in enumerate(self.ids)}
    self.vectors = self.vectors[keep]
    self.versions = self.versions[keep]
    self.alive = self.alive[keep]
    self._device_store = None
    return keep

  # -- checks ----------------------------------------------------------------

  def _check_vectors(
      self, vectors: np.ndarray, what: str, ids: Optional[Sequence[str]] = None
  ) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != self.dim:
      raise IndexInputError(
          f"{what}: vectors must be [n, {self.dim}], got "
          f"shape {vectors.shape}"
      )
    # Checked after the cast: a float64 1e39 becomes inf in float32.
    with np.errstate(over="ignore"):  # reported below, by document
      vectors = vectors.astype(np.float32, copy=False)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      name = f"document {ids[i]!r}" if ids is not None else f"row {i}"
      raise IndexInputError(
          f"{what}: {name} has a non-finite (NaN or inf) "
          f"embedding in float32 ({int(bad.sum())} such "
          "rows)"
      )
    return vectors

  def _check_ids(self, ids, vectors, what: str) -> list[str]:
    ids = list(ids)
    for i, d in enumerate(ids):
      if not isinstance(d, str):
        raise IndexInputError(
            f"{what}: document id at position {i} is "
            f"{type(d).__name__}, not str"
        )
    if len(set(ids)) != len(ids):
      seen = set()
      dup = next(d for d in ids if d in seen or seen.add(d))
      raise IndexInputError(f"{what}: duplicate document id {dup!r}")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(ids) != vectors.shape[0]:
      raise IndexInputError(
          f"{what}: {len(ids)} ids but vectors of shape " f"{vectors.shape}"
      )
    self._check_vectors(vectors, what, ids)
    return ids

  def _known_rows(self, ids: Sequence[str], what: str) -> np.ndarray:
    rows = []
    for d in ids:
      r = self.row_of.get(d)
      if r is None or not self.alive[r]:
        raise KeyError(f"{what}: unknown document id {d!r}")
      rows.append(r)
    return np.asarray(rows, np.int64)

  # -- reading ---------------------------------------------------------------

  def __len__(self) -> int:
    return int(self.alive.sum())

  def __contains__(self, doc_id: str) -> bool:
    r = self.row_of.get(doc_id)
    return r is not None and bool(self.alive[r])

  def rows(self, ids: Sequence[str]) -> np.ndarray:
    """Store rows of live documents (KeyError names an unknown id)."""
    return self._known_rows(ids, "rows")

  def get(self, ids: Sequence[str]) -> np.ndarray:
    """Stored vectors [n, D] of live documents."""
    return self.vectors[self._known_rows(ids, "get")]

  def search(
      self, queries: np.ndarray, k: int = 10, exact: bool = False
  ) -> SearchResult:
    """Top-`k` documents by inner product for each query row.

    Args:
      queries: [Q, D] float.
      exact: search the whole store exactly whatever the engine.
    """
    queries = self._check_vectors(queries, "search")
    if k < 1:
      raise IndexInputError(f"search: k must be >= 1, got {k}")
    n_live = len(self)
    if n_live == 0:
      raise IndexInputError("search: the index is empty")
    q = queries.shape[0]
    scores = np.full((q, k), -np.inf, np.float32)
    rows = np.full((q, k), -1, np.int64)
    if q == 0:
      return SearchResult(scores, rows, [])
    if self.engine == "exact" or exact:
      s, r = self._exact(queries, min(k, n_live))
    else:
      s, r = self._scann_search(queries, min(k, n_live))
    scores[:, : s.shape[1]] = s
    rows[:, : r.shape[1]] = r
    ids = [[self.ids[j] for j in row if j >= 0] for row in rows]
    return SearchResult(scores, rows, ids)

  def _exact(self, queries: np.ndarray, k: int):
    if self._device_store is None:
      self._device_store = (jnp.asarray(self.vectors), jnp.asarray(self.alive))
    d, alive = self._device_store
    return exact_top_k(queries, d, k, alive=alive)

  def _scann_search(self, queries: np.ndarray, k: int):
    if queries.shape[0] >= 64:
      ids, dist = self._scann.search_batched_parallel(
          queries, final_num_neighbors=k
      )
    else:
      ids, dist = self._scann.search_batched(queries, final_num_neighbors=k)
    q = queries.shape[0]
    scores = np.full((q, k), -np.inf, np.float32)
    rows = np.full((q, k), -1, np.int64)
    for i, (row_ids, row_d) in enumerate(zip(ids, np.asarray(dist))):
      n = len(row_ids)
      rows[i, :n] = [self.row_of[d] for d in row_ids]
      scores[i, :n] = row_d[:n]
    return scores, rows

  # -- mutation --------------------------------------------------------------

  def upsert(self, ids: Sequence[str], vectors: np.ndarray, step: int) -> None:
    """Inserts new documents and replaces the vectors of known ones.

    Every id and vector is checked before anything changes.
    """
    ids = self._check_ids(ids, vectors, "upsert")
    vectors = np.asarray(vectors, np.float32)
    if not ids:
      return
    if self._scann is not None:
      # ScaNN inserts unknown ids (new or previously deleted) and updates
      # known ones in place.
      self._scann.upsert(
          list(ids), vectors, batch_size=max(1, min(256, len(ids)))
      )
    new = [d for d in ids if d not in self.row_of]
    if new:
      base = len(self.ids)
      self.ids.extend(new)
      for j, d in enumerate(new):
        self.row_of[d] = base + j
      n = len(new)
      self.vectors = np.concatenate(
          [self.vectors, np.zeros((n, self.dim), np.float32)]
      )
      self.versions = np.concatenate([self.versions, np.zeros(n, np.int64)])
      self.alive = np.concatenate([self.alive, np.zeros(n, bool)])
    rows = np.asarray([self.row_of[d] for d in ids], np.int64)
    self.vectors[rows] = vectors
    self.versions[rows] = int(step)
    self.alive[rows] = True
    self._device_store = None

  def delete(self, ids: Sequence[str]) -> None:
    """Removes documents (KeyError names an unknown id; nothing changes)."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
      raise IndexInputError("delete: duplicate document ids")
    rows = self._known_rows(ids, "delete")
    if rows.size and rows.size == len(self):
      raise IndexInputError("delete: would leave the index empty")
    if self._scann is not None and ids:
      self._scann.delete(ids)
    self.alive[rows] = False
    self._device_store = None

  # -- persistence -----------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index to directory `path` (replaced atomically)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-index-", dir=parent)
    try:
      np.savez(
          os.path.join(tmp, "store.npz"),
          vectors=self.vectors,
          versions=self.versions,
          alive=self.alive,
      )
      # JSON keeps any id exactly (numpy strings drop trailing NULs).
      with open(os.path.join(tmp, "ids.json"), "w", encoding="utf-8") as f:
        json.dump(self.ids, f)
      if self._scann is not None:
        sdir = os.path.join(tmp, "scann")
        os.makedirs(sdir)
        self._scann.serialize(sdir, relative_path=True)
        # ScaNN pickles its document ids; loading a pickle runs whatever it
        # holds. The ids are kept as JSON instead, and the pickle dropped.
        with open(os.path.join(sdir, SCANN_IDS), "w", encoding="utf-8") as f:
          json.dump(list(self._scann.docids), f)
        pkl = os.path.join(sdir, "scann_docids.pkl")
        if os.path.exists(pkl):
          os.remove(pkl)
      with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(
            {
                "format_version": FORMAT_VERSION,
                "engine": self.engine,
                "dim": self.dim,
                "params": self.params,
                "size": len(self.ids),
                "live": len(self),
            },
            f,
            indent=1,
        )
      replace_dir(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> "VectorIndex":
    """Reads an index written by `save`."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "index.json")
    meta = read_meta(
        meta_path, "index", FORMAT_VERSION, ("engine", "dim", "params", "size")
    )
    index = cls(meta["dim"], meta["engine"], meta["params"])
    store_path = os.path.join(path, "store.npz")
    with open(os.path.join(path, "ids.json"), encoding="utf-8") as f:
      index.ids = json.load(f)
    with np.load(store_path) as z:
      index.vectors = np.ascontiguousarray(z["vectors"], np.float32)
      index.versions = z["versions"].astype(np.int64)
      index.alive = z["alive"].astype(bool)
    n = meta["size"]
    shapes = (
        len(index.ids),
        index.vectors.shape[0],
        index.versions.shape[0],
        index.alive.shape[0],
    )
    if any(s != n for s in shapes) or index.vectors.shape[1] != index.dim:
      raise IndexInputError(
          f"{store_path}: arrays disagree with {meta_path} "
          f"(size {n}, dim {index.dim}): {shapes}, "
          f"vectors {index.vectors.shape}"
      )
    index.row_of = {d: i for i, d in enumerate(index.ids)}
    if index.engine == "scann":
      import scann

      sdir = os.path.join(path, "scann")
      if not os.path.isdir(sdir):
        raise FileNotFoundError(f"{path}: missing ScaNN directory {sdir}")
      index._scann = _load_scann(sdir, index)
      if index._scann.size() != len(index):
        raise IndexInputError(
            f"{sdir}: ScaNN holds {index._scann.size()} "
            f"vectors, the store {len(index)} live ones"
        )
    return index


def _load_scann(sdir: str, index: "VectorIndex"):
  """The saved ScaNN searcher, read without unpickling anything: its ids
  from the JSON `save` writes. A folder without them (or with ScaNN's own
  pickle, which is never read) gets a searcher rebuilt from the store."""
  from scann.scann_ops.py import scann_ops_pybind as sp

  ids_path = os.path.join(sdir, SCANN_IDS)
  assets = os.path.join(sdir, "scann_assets.pbtxt")
  if os.path.isfile(ids_path) and os.path.isfile(assets):
    with open(ids_path, encoding="utf-8") as f:
      docids = json.load(f)
    if not isinstance(docids, list) or not all(
        isinstance(d, str) for d in docids
    ):
      raise IndexInputError(f"{ids_path}: expected a JSON list of ids")
    with open(assets, encoding="utf-8") as f:
      return sp.ScannSearcher(
          sp.scann_pybind.ScannNumpy(sdir, f.read()), docids
      )
  pkl = os.path.join(sdir, "scann_docids.pkl")
  why = (
      f"{pkl} is a pickle, which is never loaded (it could run code)"
      if os.path.exists(pkl)
      else f"{ids_path} is missing"
  )
  warnings.warn(f"{sdir}: {why}; rebuilding the ScaNN searcher from the store")
  rows = np.flatnonzero(index.alive)
  return _build_scann(
      index.vectors[rows], [index.ids[r] for r in rows], index.params
  )


def read_meta(
    meta_path: str, what: str, version: int, fields: Sequence[str]
) -> dict:
  """A saved object's JSON metadata, checked for its format version and
  required fields (errors name the file)."""
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"no {what} at {os.path.dirname(meta_path)} " f"(missing {meta_path})"
    )
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  for key in ("format_version",) + tuple(fields):
    if key not in meta:
      raise IndexInputError(f"{meta_path}: missing field {key!r}")
  if meta["format_version"] != version:
    raise IndexInputError(
        f"{meta_path}: format_version "
        f"{meta['format_version']}, expected {version}"
    )
  return meta


def replace_dir(tmp: str, path: str) -> None:
  """Moves directory `tmp` to `path`, replacing an existing one last."""
  if os.path.exists(path):
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)
