"""Retrieval metrics against hand computations, with trec_eval's rules."""

import math

import numpy as np
import pytest

from search_r3_jax.core.ops import exact_top_k
from search_r3_jax.retrieval import metrics


def test_ndcg_and_recall_by_hand():
  qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"x": 0}}
  run = {"q1": {"b": 0.9, "x": 0.8, "a": 0.7, "z": 0.95}, "q2": {"d": 0.5}}
  # q1 ranking: z (0), b (1), x, a (2)
  dcg = 1 / math.log2(3) + 2 / math.log2(5)
  idcg = 2 / math.log2(2) + 1 / math.log2(3)
  got = metrics.evaluate(qrels, run, ("ndcg@10", "recall@2", "recall@10"))
  assert got["queries"] == 2  # q3 has no relevant document: not evaluated
  assert got["ndcg@10"] == pytest.approx((dcg / idcg + 0.0) / 2)
  assert got["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
  assert got["recall@10"] == pytest.approx((1.0 + 0.0) / 2)


def test_ties_break_by_document_id_descending():
  qrels = {"q": {"a": 1}}
  run = {"q": {"a": 0.5, "b": 0.5}}
  # Tied scores: "b" ranks before "a", so "a" is at rank 2.
  assert metrics.evaluate(qrels, run, ("recall@1",))["recall@1"] == 0.0
  assert metrics.evaluate(qrels, run, ("ndcg@10",))["ndcg@10"] == (
      pytest.approx(1 / math.log2(3))
  )


def test_unknown_metric():
  with pytest.raises(ValueError, match="unknown metric 'map'"):
    metrics.evaluate({}, {}, ("map",))


def test_exact_top_k_matches_numpy():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((5, 7)).astype(np.float32)
  d = rng.standard_normal((40, 7)).astype(np.float32)
  scores, idx = exact_top_k(q, d, 6, chunk=2)
  want = np.argsort(-(q @ d.T), -1)[:, :6]
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(
      scores, np.take_along_axis(q @ d.T, want, -1), rtol=1e-5
  )
  run = metrics.run_from_topk(
      ["x", "y", "z", "u", "v"], [f"d{i}" for i in range(40)], scores, idx
  )
  assert list(run["x"])[0] == f"d{want[0, 0]}"
