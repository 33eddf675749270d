"""A small BM25 (numpy, scipy.sparse) for hard-negative mining and baselines.

Scoring follows Lucene's BM25 (the one Anserini/Pyserini report on BEIR):

    idf(t)      = log(1 + (N - df + 0.5) / (df + 0.5))
    score(q, d) = sum_{t in q} qtf(t) * idf(t) * tf * (k1 + 1)
                                      / (tf + k1 * (1 - b + b * |d| / avgdl))

Defaults are the textbook k1 = 1.2, b = 0.75. On the embedded default (title
plus lead indexed, the 558 FanOutQA sub-questions as queries) they give
recall@1 0.523 and recall@10 0.819, against 0.516 / 0.806 for Anserini's BEIR
defaults k1 = 0.9, b = 0.4, and they reproduce the figures in DESIGN.md.
Text is lowercased, split on Unicode word characters, and Lucene's English
stop set is removed; there is no stemming.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import sparse

# Lucene's EnglishAnalyzer default stop set (ENGLISH_STOP_WORDS_SET).
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such "
    "that the their then there these they this to was will with".split()
)

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
  """Lowercased word tokens without stopwords."""
  return [t for t in _WORD.findall(text.lower()) if t not in STOPWORDS]


class BM25:
  """An in-memory BM25 index over a list of documents.

  Documents are addressed by their position in the list given to the
  constructor. Scores are float64 so that rankings do not depend on the order
  of floating-point sums.
  """

  def __init__(self, docs: Sequence[str], *, k1: float = 1.2, b: float = 0.75):
    """Indexes `docs`.

    Args:
      docs: document texts (include the title in the text if it should count).
      k1: term-frequency saturation.
      b: document-length normalisation, 0 (none) to 1 (full).
    """
    self.k1, self.b = float(k1), float(b)
    self.vocab: dict[str, int] = {}
    rows, cols = [], []
    lengths = np.zeros(len(docs), np.float64)
    for i, doc in enumerate(docs):
      ids = [self.vocab.setdefault(t, len(self.vocab)) for t in tokenize(doc)]
      lengths[i] = len(ids)
      rows.append(np.full(len(ids), i, np.int64))
      cols.append(np.asarray(ids, np.int64))
    n_docs, n_terms = len(docs), len(self.vocab)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    # Duplicate (doc, term) entries are summed by the COO->CSR conversion,
    # which turns token occurrences into term frequencies.
    tf = sparse.coo_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(n_docs, n_terms)
    ).tocsr()
    tf.sum_duplicates()
    df = np.bincount(tf.indices, minlength=n_terms).astype(np.float64)
    self.idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    avgdl = lengths.mean() if n_docs else 1.0
    norm = self.k1 * (1.0 - self.b + self.b * lengths / max(avgdl, 1e-9))
    doc_of_entry = np.repeat(np.arange(n_docs), np.diff(tf.indptr))
    w = (
        tf.data
        * (self.k1 + 1.0)
        / (tf.data + norm[doc_of_entry])
        * self.idf[tf.indices]
    )
    # Stored terms x docs, so a batch of queries scores as one sparse matmul.
    self._weights = sparse.csr_matrix(
        (w, tf.indices, tf.indptr), shape=(n_docs, n_terms)
    ).T.tocsr()
    self.n_docs = n_docs

  def _query_matrix(self, queries: Sequence[str]) -> sparse.csr_matrix:
    rows, cols = [], []
    for i, q in enumerate(queries):
      for t in tokenize(q):
        j = self.vocab.get(t)
        if j is not None:  # a term no document has scores nothing
          rows.append(i)
          cols.append(j)
    return sparse.coo_matrix(
        (np.ones(len(rows)), (rows, cols)),
        shape=(len(queries), len(self.vocab)),
    ).tocsr()

  def scores(self, queries: Sequence[str]) -> np.ndarray:
    """Dense scores [len(queries), n_docs]."""
    return (self._query_matrix(queries) @ self._weights).toarray()

  def search(
      self,
      queries: Sequence[str],
      k: int,
      *,
      exclude: Optional[Sequence[Iterable[int]]] = None,
      batch_size: int = 256,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents per query, best first.

    Ties are broken by the lower document index, so results are reproducible.

    Args:
      queries: query texts.
      k: how many documents to return per query (at most n_docs).
      exclude: per query, document indices never to return (e.g. the
        positive when mining negatives).
      batch_size: queries scored at once (bounds the dense score block).

    Returns:
      (indices [n, k] int64, scores [n, k] float64). Where fewer than k
      documents remain after exclusion, the tail is -1 with score -inf.
    """
    n = len(queries)
    k = max(0, min(k, self.n_docs))
    top_i = np.full((n, k), -1, np.int64)
    top_s = np.full((n, k), -np.inf)
    for start in range(0, n if k else 0, batch_size):
      block = self.scores(queries[start : start + batch_size])
      for r, row in enumerate(block):
        q = start + r
        if exclude is not None:
          row[list(exclude[q])] = -np.inf
        if k < len(row):
          # Everything tied with the k-th best stays a candidate, then a stable
          # (score, index) order picks k of them.
          kth = np.partition(row, len(row) - k)[len(row) - k]
          cand = np.flatnonzero(row >= kth)
        else:
          cand = np.arange(len(row))
        order = cand[np.lexsort((cand, -row[cand]))][:k]
        order = order[np.isfinite(row[order])]
        top_i[q, : len(order)] = order
        top_s[q, : len(order)] = row[order]
    return top_i, top_s
