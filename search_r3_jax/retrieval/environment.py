"""The stage-2 retrieval environment: a corpus index that follows the policy.

In stage 2 the policy is also the document encoder, so stored corpus
embeddings go stale with every update. `RetrievalEnvironment` keeps them
fresh where it matters, without re-encoding the corpus at every step:

  * **Regions.** Documents are partitioned by spherical k-means into about
    sqrt(N) regions (`num_regions`), computed jitted on the device.
  * **Graph.** Each document is linked to its `graph_k` nearest neighbours,
    found through the index.
  * **Touched documents.** Each step, `observe(gold, retrieved)` marks the
    gold documents, the retrieved top-k, and the graph neighbours of the gold
    documents (`touch_neighbors="gold"`; "all" adds the retrieved documents'
    neighbours, "none" marks no neighbour).
  * **Selective refresh.** Every `refresh_every` steps (`maybe_refresh`), a
    probe sample of `probes_per_region` documents per region is re-encoded
    with the current parameters; a region's drift is the mean of
    1 - cos(stored, fresh) over its probes. With `drift_scale`
    "neighbourhood" (the default) that drift is compared in the region's own
    scale: sqrt(drift / radius), where the radius is the region's median
    1 - cos between a document and its `graph_k`-th neighbour, i.e. the
    fraction of the way to its k-th neighbour that a document moved (one
    threshold then serves a tight, untrained embedding space and a spread,
    trained one alike); "absolute" compares 1 - cos itself. Every region
    whose drift is at least `drift_threshold` is re-encoded whole (its probes' fresh vectors
    re-used), together with the touched documents; they are upserted with
    the current step as their version, moved to their nearest region
    centroid, and their kNN links are searched anew. Probes of regions that
    did not drift are measurements only and are not written.
  * **Full refresh.** When the documents re-encoded since the last rebuild
    (counting the ones about to be) would pass `rebuild_fraction` of the
    corpus, or every `full_refresh_every` steps (0: never on a schedule),
    everything is re-encoded and the regions, index and graph are rebuilt.
    With `drift_threshold` 0 every region is selected, so a refresh
    re-encodes and writes every document exactly once; with an infinite
    threshold and nothing touched it writes nothing (the probes are still
    encoded, to measure drift).

The encode function is the caller's: texts -> [n, D] unit vectors, batched
and jitted on the device mesh (`document_encoder` wraps a `SearchR3`). Only
index work (ScaNN, bookkeeping) runs on the host. Each refresh returns a
report (also logged): what was re-encoded, the drift of every region, and the
time of each phase.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import shutil
import tempfile
import time
from typing import Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.retrieval.env_config import EnvConfig
from search_r3_jax.retrieval.index import IndexInputError
from search_r3_jax.retrieval.index import read_meta
from search_r3_jax.retrieval.index import replace_dir
from search_r3_jax.retrieval.index import SearchResult
from search_r3_jax.retrieval.index import VectorIndex
from search_r3_jax.retrieval.regions import kmeans
from search_r3_jax.retrieval.regions import nearest_region

EncodeFn = Callable[[Sequence[str]], np.ndarray]
FORMAT_VERSION = 1


def document_encoder(
    model, *, max_length: int = 128, batch_size: int = 32, per_process=False
) -> EncodeFn:
  """Encode function of a `Policy` (batched, jitted on its mesh). With
  `per_process` each process of a pod encodes its own texts
  (`Policy.encode_documents(per_process=True)`): a collective, marked
  `encode.collective`, which the environment calls even with no texts so
  that every process makes the same calls."""

  def encode(texts: Sequence[str]) -> np.ndarray:
    if per_process:
      return model.encode_documents(
          list(texts),
          batch_size=batch_size,
          max_length=max_length,
          progress=False,
          per_process=True,
      )
    return model.encode_documents(
        list(texts),
        batch_size=batch_size,
        max_length=max_length,
        progress=False,
    )

  encode.collective = bool(per_process)
  return encode


# -- the environment ---------------------------------------------------------


def _check_step(step) -> int:
  """A training step: a non-negative integer (checked before any change)."""
  try:
    value = operator.index(step)
  except TypeError:
    raise TypeError(f"step must be an integer, got {step!r}") from None
  if value < 0:
    raise ValueError(f"step must be >= 0, got {value}")
  return value


def _flatten(ids) -> list[str]:
  """A flat list of ids from a list of ids or of lists of ids."""
  if isinstance(ids, str):
    raise TypeError(f"expected a list of document ids, got the string {ids!r}")
  out = []
  for x in ids:
    if isinstance(x, str):
      out.append(x)
    else:
      out.extend(x)
  return out


class RetrievalEnvironment:
  """Corpus embeddings in an index, refreshed where the policy moved them.

  Attributes:
    doc_ids: the corpus ids, in store order.
    index: the `VectorIndex` (its `versions` hold each vector's step).
    regions: [N] region of each document.
    centroids: [R, D] region centroids.
    graph: [N, graph_k] store rows of each document's nearest neighbours
      (-1 where fewer exist).
    touched: [N] bool, marked since the last refresh.
    step: the step of the last refresh (or of the build).
    reports: every refresh report, in order.
  """

  def __init__(
      self,
      corpus: Mapping[str, str],
      encode: Optional[EncodeFn] = None,
      cfg: Optional[EnvConfig] = None,
      step: int = 0,
      *,
      vectors: Optional[np.ndarray] = None,
  ):
    """Encodes `corpus` ({id: text}) with `encode` and builds the index,
    regions and graph; or starts from `vectors` ([N, D], one per document
    in corpus order, e.g. the embeddings stage 1 computed), stale or not:
    refreshing them is the environment's job."""
    self._init_state(corpus, cfg or EnvConfig(), step)
    if (encode is None) == (vectors is None):
      raise ValueError("give the environment either encode or vectors")
    t = time.perf_counter()
    if vectors is None:
      vectors = self._encode(encode, np.arange(len(self.doc_ids)))
    else:
      vectors = np.array(vectors, np.float32, copy=True)
      if vectors.ndim != 2 or vectors.shape[0] != len(self.doc_ids):
        raise ValueError(
            f"vectors of shape {vectors.shape} for "
            f"{len(self.doc_ids)} documents"
        )
    t_encode = time.perf_counter() - t
    timings = self._rebuild(vectors, step)  # VectorIndex checks the values
    logging.info(
        "environment built over %d documents, %d regions "
        "(encode %.1fs, index %.2fs, graph %.2fs)",
        len(self.doc_ids),
        len(self.centroids),
        t_encode,
        timings["index"],
        timings["graph"],
    )

  def _init_state(
      self,
      corpus: Mapping[str, str],
      cfg: EnvConfig,
      step: int,
      *,
      last_full: Optional[int] = None,
      index: Optional[VectorIndex] = None,
      regions: Optional[np.ndarray] = None,
      centroids: Optional[np.ndarray] = None,
      graph: Optional[np.ndarray] = None,
      touched: Optional[np.ndarray] = None,
      refreshed_since: Optional[np.ndarray] = None,
  ) -> None:
    """Checks `cfg` and `corpus` and creates every attribute of the object.

    This is the one place state is created, shared by the two ways to make
    an environment: `__init__` passes only the corpus and then builds the
    index, regions and graph (`_rebuild`); `_from_state` (for `load`) passes
    the saved pieces. A piece not given starts empty (no marks, no index).
    """
    cfg.check()
    if not corpus:
      raise ValueError("the environment needs a non-empty corpus")
    self.cfg = cfg
    # The corpus in store order: row r of every [N] array below and of the
    # index is document doc_ids[r], whose text `refresh` encodes.
    self.doc_ids = list(corpus)
    self.texts = [corpus[d] for d in self.doc_ids]
    n = len(self.doc_ids)
    # What is stored: the index, the regions (k-means over the stored
    # vectors) and the kNN graph. None/empty until `_rebuild` fills them.
    self.index: Optional[VectorIndex] = index
    self.centroids = (
        np.zeros((0, 0), np.float32) if centroids is None else centroids
    )
    self.regions = np.zeros((0,), np.int64) if regions is None else regions
    self.graph = (
        np.full((0, cfg.graph_k), -1, np.int64) if graph is None else graph
    )
    # Refresh bookkeeping: documents marked by `observe` since the last
    # refresh, and documents re-encoded since the last full rebuild (what
    # `rebuild_fraction` is measured against).
    self.touched = np.zeros(n, bool) if touched is None else touched
    self.refreshed_since = (
        np.zeros(n, bool) if refreshed_since is None else refreshed_since
    )
    self.step = int(step)
    self.last_full = int(step) if last_full is None else last_full
    self.reports: list[dict] = []

  @classmethod
  def _from_state(
      cls,
      corpus: Mapping[str, str],
      cfg: EnvConfig,
      step: int,
      last_full: int,
      index: VectorIndex,
      regions: np.ndarray,
      centroids: np.ndarray,
      graph: np.ndarray,
      touched: np.ndarray,
      refreshed_since: np.ndarray,
  ) -> "RetrievalEnvironment":
    """An environment over already-built pieces, encoding nothing.

    `corpus` must be in the index's store order. Goes around `__init__`,
    which would encode the corpus and rebuild everything.
    """
    env = cls.__new__(cls)
    env._init_state(
        corpus,
        cfg,
        step,
        last_full=int(last_full),
        index=index,
        regions=regions,
        centroids=centroids,
        graph=graph,
        touched=touched,
        refreshed_since=refreshed_since,
    )
    return env

  @property
  def size(self) -> int:
    return len(self.doc_ids)

  # -- encoding and (re)building ----------------------------------------------

  def _encode(self, encode: EncodeFn, rows: np.ndarray) -> np.ndarray:
    """Fresh vectors of `rows`, checked before anything uses them."""
    if rows.size == 0 and not getattr(encode, "collective", False):
      return np.zeros(
          (0, self.index.dim if self.index is not None else 0), np.float32
      )
    out = np.asarray(encode([self.texts[r] for r in rows]))
    if rows.size == 0:  # a collective encoder's share of nothing
      return out.reshape(0, -1).astype(np.float32)
    if out.ndim != 2 or out.shape[0] != rows.size:
      raise ValueError(
          f"encode returned shape {out.shape} for {rows.size} " "documents"
      )
    # No index yet (the first build): any dimension will do.
    if self.index is not None and out.shape[1] != self.index.dim:
      raise ValueError(
          f"encode returned dimension {out.shape[1]}, the index "
          f"holds {self.index.dim}"
      )
    # Raised here, before any write, so a bad encode leaves the index as is.
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
      d = self.doc_ids[int(rows[np.flatnonzero(bad)[0]])]
      raise ValueError(
          f"encode returned a non-finite embedding for document "
          f"{d!r} ({int(bad.sum())} such documents); nothing "
          "was changed"
      )
    return out.astype(np.float32, copy=False)

  def _rebuild(self, vectors: np.ndarray, step: int) -> dict[str, float]:
    """New index, regions and graph over `vectors` (one per document)."""
    t0 = time.perf_counter()
    index = VectorIndex.build(
        self.doc_ids, vectors, step, engine=self.cfg.engine, k=self.cfg.k
    )
    t1 = time.perf_counter()
    r = self.cfg.num_regions or int(round(math.sqrt(len(self.doc_ids))))
    # Seeded by the step too: a resumed run rebuilds the same regions, and
    # rebuilds at different steps do not all start from one initialisation.
    centroids, regions = kmeans(
        vectors, r, self.cfg.kmeans_iters, self.cfg.seed + step
    )
    t2 = time.perf_counter()
    # Everything is computed before anything is replaced.
    self.index = index
    self.centroids, self.regions = centroids, regions
    self.graph = np.full((self.size, self.cfg.graph_k), -1, np.int64)
    self._relink(np.arange(self.size))
    t3 = time.perf_counter()
    return {"index": t1 - t0, "regions": t2 - t1, "graph": t3 - t2}

  def _region_members(self) -> list[np.ndarray]:
    """The document rows of each region, in region order."""
    # Stable: members stay in row order, so seeded probe draws are
    # reproducible.
    order = np.argsort(self.regions, kind="stable")
    bounds = np.searchsorted(
        self.regions[order], np.arange(len(self.centroids) + 1)
    )
    return [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]

  def _region_radius(self) -> np.ndarray:
    """[R] median 1 - cos between a region's documents and their
    `graph_k`-th (else farthest linked) neighbour, from the stored vectors."""
    has = self.graph >= 0
    # Links are nearest first, so the last one is the farthest; a document
    # with no link gets NaN and is left out of its region's median.
    last = np.where(has.any(1), has.sum(1) - 1, 0)
    nb = self.graph[np.arange(self.size), last]
    ok = nb >= 0
    v = self.index.vectors
    rows = np.flatnonzero(ok)
    dist = np.full(self.size, np.nan)
    dist[rows] = 1.0 - np.sum(v[rows] * v[nb[rows]], axis=1)
    out = np.full(len(self.centroids), np.nan)
    for r, members in enumerate(self._region_members()):
      d = dist[members]
      d = d[np.isfinite(d)]
      if d.size:
        out[r] = max(float(np.median(d)), 0.0)
    return out

  def _relink(self, rows: np.ndarray, chunk: int = 4096) -> None:
    """Searches the kNN links of `rows` anew (self excluded)."""
    k = self.cfg.graph_k
    # Chunked to bound the search's memory on a large corpus.
    for s in range(0, rows.size, chunk):
      part = rows[s : s + chunk]
      # k + 1: a document is normally its own nearest hit and is dropped.
      res = self.index.search(self.index.vectors[part], k + 1)
      for i, r in enumerate(part):
        links = [j for j in res.rows[i] if j >= 0 and j != r][:k]
        self.graph[r] = -1
        self.graph[r, : len(links)] = links

  # -- stepping --------------------------------------------------------------

  def search(
      self, queries: np.ndarray, k: Optional[int] = None
  ) -> SearchResult:
    """Top-k documents (default `cfg.k`) for each query embedding."""
    return self.index.search(queries, self.cfg.k if k is None else k)

  def embeddings(self, ids: Sequence[str]) -> np.ndarray:
    """Stored (possibly stale) vectors of documents."""
    return self.index.get(ids)

  def observe(
      self,
      gold: Sequence[Sequence[str]] | Sequence[str],
      retrieved: Sequence[Sequence[str]] | Sequence[str] = (),
  ) -> int:
    """Marks the documents a step touched.

    Args:
      gold: the step's gold document ids (a flat list or one list per query).
      retrieved: the ids the index returned for the step's embeddings.
    With `touch_neighbors` "gold" the gold documents' graph neighbours are
    marked too, with "all" the retrieved ones' as well. An unknown id raises
    KeyError and marks nothing.

    Returns:
      How many documents are marked now.
    """
    # All ids are resolved (KeyError on an unknown one) before any mark.
    gold_rows = self.index.rows(_flatten(gold))
    retrieved_rows = self.index.rows(_flatten(retrieved))
    mode = self.cfg.touch_neighbors
    hubs = {
        "gold": gold_rows,
        "none": gold_rows[:0],
        "all": np.concatenate([gold_rows, retrieved_rows]),
    }[mode]
    nb = self.graph[hubs].ravel()
    self.touched[
        np.concatenate([gold_rows, retrieved_rows, nb[nb >= 0]]).astype(
            np.int64
        )
    ] = True
    return int(self.touched.sum())

  def maybe_refresh(self, step: int, encode: EncodeFn) -> Optional[dict]:
    """`refresh` on steps that are multiples of `refresh_every`."""
    step = _check_step(step)
    if step % self.cfg.refresh_every:
      return None
    return self.refresh(step, encode)

  def refresh(self, step: int, encode: EncodeFn, full: bool = False) -> dict:
    """Brings the index up to date with `encode` (the current parameters).

    Returns:
      The report: `kind` ("selective" or "full"), `reencoded` (documents
      encoded, probes included), `refreshed` (documents written to the
      index), `reencoded_fraction` (`reencoded` over the corpus size),
      `probed`, `touched`, `drifted_regions`, `region_drift` (mean probe
      1 - cos), `region_radius`, `region_score` (what the threshold sees;
      `score_max` its largest) (lists, one per
      region), `drift_mean`, `drift_max`, `since_rebuild_fraction`,
      `stale_mean` (mean steps since each stored vector was written) and the
      seconds of each phase (`time_probe`, `time_encode`, `time_upsert`,
      `time_graph`, `time_rebuild`, `time_total`).
    """
    step = _check_step(step)
    t_start = time.perf_counter()
    # 1. Measure: how far the policy moved each region.
    probes = self._sample_probes(step)
    fresh_probes = self._encode(encode, probes)
    region_drift, radius, region_score = self._measure_drift(
        probes, fresh_probes
    )
    t_probe = time.perf_counter() - t_start
    # 2. Select the rows to re-encode. The measurement half of the report is
    # taken now, while the regions are still those the drift was measured in.
    drifted, selected = self._select(region_score)
    report = self._report(
        step, probes, drifted, region_drift, radius, region_score, t_probe
    )
    # 3. Re-encode and write: everything, or only the selected rows.
    if full or self._wants_full(step, selected):
      report.update(self._full_refresh(step, encode, probes, fresh_probes))
    else:
      report.update(
          self._selective_refresh(step, encode, probes, fresh_probes, selected)
      )
    # Only now, once the write succeeded: a failed refresh keeps its marks.
    self.touched[:] = False
    self.step = int(step)
    self._finish_report(report, t_start)
    self.reports.append(report)
    self._log_refresh(report)
    return report

  # -- refresh phases (in the order `refresh` runs them) ---------------------

  def _sample_probes(self, step: int) -> np.ndarray:
    """Sorted rows of up to `probes_per_region` random documents per region.

    They are re-encoded to measure each region's drift: a few per region
    are enough to tell which regions moved, at a small fraction of the cost
    of re-encoding the corpus.
    """
    cfg = self.cfg
    probes = []
    # Seeded by (seed, step): a resumed run draws the same probes. Regions
    # are drawn in region order, each from its members in row order.
    rng = np.random.default_rng([cfg.seed, int(step)])
    if cfg.probes_per_region:
      for members in self._region_members():
        if members.size:
          take = min(cfg.probes_per_region, members.size)
          probes.append(rng.choice(members, take, replace=False))
    return (
        np.sort(np.concatenate(probes)) if probes else np.zeros((0,), np.int64)
    )

  def _measure_drift(
      self, probes: np.ndarray, fresh_probes: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region drift of the stored vectors, and its scale.

    Returns:
      [R] arrays: `region_drift`, the mean 1 - cos(stored, fresh) over the
      region's probes (NaN for a region without probes); `radius`, the
      region's neighbourhood radius (`_region_radius`); and `region_score`,
      the drift in `drift_scale`, which `_select` compares to the threshold.
    """
    nreg = len(self.centroids)
    stored = self.index.vectors[probes]
    cos = np.sum(l2_normalize(stored) * l2_normalize(fresh_probes), axis=1)
    # Clamped at 0: rounding can put cos a hair above 1.
    drift_each = np.maximum(1.0 - cos, 0.0)
    region_drift = np.full(nreg, np.nan)
    if probes.size:
      sums = np.bincount(self.regions[probes], drift_each, minlength=nreg)
      counts = np.bincount(self.regions[probes], minlength=nreg)
      region_drift = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    radius = self._region_radius()
    # "neighbourhood": the fraction of the way to the k-th neighbour moved,
    # so one threshold fits a tight (untrained) and a spread (trained)
    # embedding space alike. The floor keeps a degenerate radius finite.
    if self.cfg.drift_scale == "neighbourhood":
      region_score = np.sqrt(region_drift / np.maximum(radius, 1e-12))
    else:
      region_score = region_drift
    return region_drift, radius, region_score

  def _select(self, region_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drifted regions and touched documents -> the rows to re-encode.

    Returns:
      The drifted regions (ids whose score reaches `drift_threshold`) and an
      [N] bool mask of the rows to re-encode: every document of a drifted
      region, plus every touched document wherever it lies.
    """
    cfg = self.cfg
    nreg = len(self.centroids)
    if cfg.probes_per_region:
      # A region without a probe (empty) has a NaN score; threshold 0
      # still selects it, so that 0 always means everything.
      unknown = -1.0 if cfg.drift_threshold > 0 else 0.0
      drifted = np.flatnonzero(
          np.nan_to_num(region_score, nan=unknown) >= cfg.drift_threshold
      )
    else:  # no probes: the threshold alone decides (0 selects all)
      drifted = (
          np.arange(nreg)
          if cfg.drift_threshold <= 0
          else np.zeros((0,), np.int64)
      )
    selected = self.touched | np.isin(self.regions, drifted)
    return drifted, selected

  def _wants_full(self, step: int, selected: np.ndarray) -> bool:
    """Whether this refresh must re-encode everything and rebuild.

    Counting the rows about to be re-encoded, so a selective refresh never
    takes the corpus past `rebuild_fraction` re-encoded since the last
    rebuild (past it, the regions were fitted to vectors that have mostly
    been replaced); or when `full_refresh_every` steps have passed.
    """
    cfg = self.cfg
    since = (self.refreshed_since | selected).mean()
    scheduled = (
        cfg.full_refresh_every
        and step - self.last_full >= cfg.full_refresh_every
    )
    return since > cfg.rebuild_fraction or bool(scheduled)

  def _full_refresh(
      self,
      step: int,
      encode: EncodeFn,
      probes: np.ndarray,
      fresh_probes: np.ndarray,
  ) -> dict:
    """Re-encodes every document and rebuilds index, regions and graph.

    The probes' fresh vectors are re-used, so each document is encoded
    exactly once in the refresh. Returns the report's write half.
    """
    n = self.size
    t = time.perf_counter()
    rest = np.setdiff1d(np.arange(n), probes)
    vectors = np.zeros((n, self.index.dim), np.float32)
    vectors[probes] = fresh_probes
    vectors[rest] = self._encode(encode, rest)
    t_encode = time.perf_counter() - t
    timings = self._rebuild(vectors, step)
    self.refreshed_since[:] = False
    self.last_full = int(step)
    return dict(
        kind="full",
        reencoded=n,
        refreshed=n,
        time_encode=t_encode,
        time_upsert=0.0,
        time_graph=timings["graph"],
        time_rebuild=timings["index"] + timings["regions"],
    )

  def _selective_refresh(
      self,
      step: int,
      encode: EncodeFn,
      probes: np.ndarray,
      fresh_probes: np.ndarray,
      selected: np.ndarray,
  ) -> dict:
    """Re-encodes and writes the `selected` rows, keeping the regions.

    A probe among them keeps its fresh vector instead of being encoded
    again; a probe outside them was a measurement only and is not written,
    so what is written is exactly what was selected. The written documents
    move to their nearest centroid and are relinked. Returns the report's
    write half.
    """
    t = time.perf_counter()
    rows = np.flatnonzero(selected)
    probed = np.isin(probes, rows)  # probes whose vector is kept
    others = np.setdiff1d(rows, probes)
    vectors = np.zeros((rows.size, self.index.dim), np.float32)
    # `rows`, `probes` and `others` are sorted: searchsorted finds each
    # vector's place in `rows`.
    vectors[np.searchsorted(rows, probes[probed])] = fresh_probes[probed]
    vectors[np.searchsorted(rows, others)] = self._encode(encode, others)
    t_encode = time.perf_counter() - t
    t = time.perf_counter()
    if rows.size:
      self.index.upsert([self.doc_ids[r] for r in rows], vectors, step)
      self.regions[rows] = nearest_region(vectors, self.centroids)
    t_upsert = time.perf_counter() - t
    t = time.perf_counter()
    self._relink(rows)
    t_graph = time.perf_counter() - t
    self.refreshed_since |= selected
    return dict(
        kind="selective",
        reencoded=int(probes.size + others.size),
        refreshed=int(rows.size),
        time_encode=t_encode,
        time_upsert=t_upsert,
        time_graph=t_graph,
        time_rebuild=0.0,
    )

  def _report(
      self,
      step: int,
      probes: np.ndarray,
      drifted: np.ndarray,
      region_drift: np.ndarray,
      radius: np.ndarray,
      region_score: np.ndarray,
      t_probe: float,
  ) -> dict:
    """The measurement half of a refresh report, taken before any write.

    Plain Python values (floats, lists), so a report can be logged or
    written as JSON. The drift summaries are NaN when nothing was probed.
    """
    nothing = not probes.size
    return {
        "step": int(step),
        "probed": int(probes.size),
        "touched": int(self.touched.sum()),
        "drifted_regions": int(drifted.size),
        "regions": len(self.centroids),
        "region_drift": [float(x) for x in region_drift],
        "region_radius": [float(x) for x in radius],
        "region_score": [float(x) for x in region_score],
        "score_max": (
            float("nan") if nothing else float(np.nanmax(region_score))
        ),
        "drift_mean": (
            float("nan") if nothing else float(np.nanmean(region_drift))
        ),
        "drift_max": (
            float("nan") if nothing else float(np.nanmax(region_drift))
        ),
        "time_probe": t_probe,
    }

  def _finish_report(self, report: dict, t_start: float) -> None:
    """Adds the fields that describe the index after the write."""
    report["reencoded_fraction"] = report["reencoded"] / self.size
    report["since_rebuild_fraction"] = float(self.refreshed_since.mean())
    report["stale_mean"] = float(
        self.step - self.index.versions[self.index.alive].mean()
    )
    report["time_total"] = time.perf_counter() - t_start

  def _log_refresh(self, report: dict) -> None:
    """One log line per refresh: what was re-encoded and why."""
    logging.info(
        "refresh step %d: %s, re-encoded %d/%d (%.3f), wrote %d (%d probes, "
        "%d touched, %d/%d regions drifted, drift mean %.4f max %.4f) in "
        "%.2fs",
        report["step"],
        report["kind"],
        report["reencoded"],
        self.size,
        report["reencoded_fraction"],
        report["refreshed"],
        report["probed"],
        report["touched"],
        report["drifted_regions"],
        report["regions"],
        report["drift_mean"],
        report["drift_max"],
        report["time_total"],
    )

  # -- persistence -----------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes the environment (index, regions, graph, marks) to `path`,
    replacing it atomically. The corpus texts are not saved."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written next to `path` (same file system), so that `replace_dir` can
    # swap it in by renaming; a crash leaves the old environment intact.
    tmp = tempfile.mkdtemp(prefix=".tmp-env-", dir=os.path.dirname(path))
    try:
      self.index.save(os.path.join(tmp, "index"))
      np.savez(
          os.path.join(tmp, "environment.npz"),
          regions=self.regions,
          centroids=self.centroids,
          graph=self.graph,
          touched=self.touched,
          refreshed_since=self.refreshed_since,
      )
      with open(os.path.join(tmp, "environment.json"), "w") as f:
        json.dump(
            {
                "format_version": FORMAT_VERSION,
                "config": dataclasses.asdict(self.cfg),
                "step": self.step,
                "last_full": self.last_full,
                "size": self.size,
            },
            f,
            indent=1,
        )
      replace_dir(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(
      cls, path: str | os.PathLike, corpus: Mapping[str, str]
  ) -> "RetrievalEnvironment":
    """Reads an environment written by `save`; `corpus` must hold exactly
    the saved documents (their texts are what later refreshes encode)."""
    path = os.fspath(path)
    meta = read_meta(
        os.path.join(path, "environment.json"),
        "environment",
        FORMAT_VERSION,
        ("config", "step", "last_full", "size"),
    )
    cfg = EnvConfig.from_mapping(meta["config"])
    arrays_path = os.path.join(path, "environment.npz")
    with np.load(arrays_path) as z:
      arrays = {k: z[k] for k in z.files}
    index = VectorIndex.load(os.path.join(path, "index"))
    saved_ids = index.ids  # the environment's documents, in store order
    saved = set(saved_ids)
    missing = [d for d in saved_ids if d not in corpus]
    extra = [d for d in corpus if d not in saved]
    if missing or extra:
      raise ValueError(
          f"{path}: the corpus differs from the saved one "
          f"({len(missing)} saved ids missing, e.g. "
          f"{missing[:3]}; {len(extra)} new ids, e.g. "
          f"{extra[:3]})"
      )
    # The corpus is re-ordered into the index's store order: the saved
    # arrays are indexed by store row, whatever order the caller's is in.
    env = cls._from_state(
        {d: corpus[d] for d in saved_ids},
        cfg,
        meta["step"],
        last_full=meta["last_full"],
        index=index,
        regions=arrays["regions"].astype(np.int64),
        centroids=arrays["centroids"].astype(np.float32),
        graph=arrays["graph"].astype(np.int64),
        touched=arrays["touched"].astype(bool),
        refreshed_since=arrays["refreshed_since"].astype(bool),
    )
    for name in ("regions", "graph", "touched", "refreshed_since"):
      if getattr(env, name).shape[0] != env.size:
        raise ValueError(
            f"{arrays_path}: {name} has "
            f"{getattr(env, name).shape[0]} rows, expected "
            f"{env.size}"
        )
    return env


__all__ = [
    "EnvConfig",
    "RetrievalEnvironment",
    "document_encoder",
    "kmeans",
    "IndexInputError",
]
