"""Retrieval metrics with trec_eval semantics, and exact search.

trec_eval conventions kept here:
  * only queries that have at least one relevant document in the qrels are
    evaluated, and the mean is over those queries (a query with no
    retrieved relevant document counts as 0);
  * a run is ranked by score, descending; ties are broken by document id,
    descending;
  * nDCG@k uses the graded relevance as gain, discount log2(rank + 1), and
    the ideal ranking of all judged relevant documents of the query;
  * Recall@k = relevant documents in the top k / all relevant documents
    (relevance > 0).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]  # query id -> {doc id: relevance}
Run = Mapping[str, Mapping[str, float]]  # query id -> {doc id: score}


def ranked(scores: Mapping[str, float]) -> list[str]:
  """Document ids best first, ties by document id descending (trec_eval's
  order, which run files written here keep)."""
  return [
      d
      for d, _ in sorted(
          scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True
      )
  ]


def ndcg_at(
    qrels: Mapping[str, int], scores: Mapping[str, float], k: int
) -> float:
  top = ranked(scores)[:k]
  dcg = sum(
      qrels.get(d, 0) / math.log2(i + 2)
      for i, d in enumerate(top)
      if qrels.get(d, 0) > 0
  )
  ideal = sorted((r for r in qrels.values() if r > 0), reverse=True)[:k]
  idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
  return dcg / idcg if idcg > 0 else 0.0


def recall_at(
    qrels: Mapping[str, int], scores: Mapping[str, float], k: int
) -> float:
  relevant = {d for d, r in qrels.items() if r > 0}
  if not relevant:
    return 0.0
  return len(relevant.intersection(ranked(scores)[:k])) / len(relevant)


def evaluate(
    qrels: Qrels,
    run: Run,
    metrics: Sequence[str] = ("ndcg@10", "recall@10", "recall@100"),
) -> dict[str, float]:
  """Mean metrics over the queries with relevant documents.

  Args:
    qrels: judgements; queries without a relevant document are skipped.
    run: retrieved documents with scores per query (a query missing from the
      run scores 0).
    metrics: names "ndcg@K" or "recall@K".
  Returns:
    {metric name: mean} plus "queries": how many were evaluated.
  """
  fns = {"ndcg": ndcg_at, "recall": recall_at}
  parsed = []
  for m in metrics:
    name, _, k = m.partition("@")
    if name not in fns or not k.isdigit():
      raise ValueError(f"unknown metric {m!r}; use ndcg@K or recall@K")
    parsed.append((m, fns[name], int(k)))
  judged = [q for q, rel in qrels.items() if any(r > 0 for r in rel.values())]
  out = {m: 0.0 for m, _, _ in parsed}
  for q in judged:
    scores = run.get(q, {})
    for m, fn, k in parsed:
      out[m] += fn(qrels[q], scores, k)
  n = max(len(judged), 1)
  out = {m: v / n for m, v in out.items()}
  out["queries"] = len(judged)
  return out


def run_from_topk(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores: np.ndarray,
    indices: np.ndarray,
) -> dict:
  """A trec-style run dict from top-k scores and document indices
  (`core.ops.exact_top_k`'s output; an index below 0, a hit an engine did
  not find, is left out)."""
  return {
      q: {doc_ids[int(j)]: float(s) for s, j in zip(srow, irow) if j >= 0}
      for q, srow, irow in zip(query_ids, scores, indices)
  }
