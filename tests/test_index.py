"""VectorIndex: ScaNN against exact search, mutations, persistence, bad input.

Every test runs on synthetic clustered unit vectors; the only expensive
fixture (20k vectors, a ScaNN tree) is built once per module.
"""

import json
import os
import re

import numpy as np
import pytest

from search_r3_jax.retrieval import index as vindex
from search_r3_jax.retrieval.index import IndexInputError
from search_r3_jax.retrieval.index import scann_params
from search_r3_jax.retrieval.index import SearchResult
from search_r3_jax.retrieval.index import VectorIndex

ENGINES = ("scann", "exact")
D = 16


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(rng, n, d, centres, noise=0.3):
  lab = rng.integers(0, centres.shape[0], n)
  return _unit(centres[lab] + noise * rng.standard_normal((n, d)))


def _tree_params(n, k=10):
  """ScaNN tree + AH parameters for a corpus below SCANN_TREE_MIN, so the
  tree's upsert/delete paths are tested on small fixtures too."""
  leaves = round(n**0.5)
  return {
      "kind": "tree_ah",
      "num_neighbors": k,
      "num_leaves": leaves,
      "num_leaves_to_search": 8,
      "training_sample_size": n,
      "dims_per_block": 2,
      "anisotropic_quantization_threshold": 0.2,
      "reorder": 100,
  }


def _small(engine, n=300, d=D, seed=0, step=3):
  rng = np.random.default_rng(seed)
  x = _clustered(rng, n, d, rng.standard_normal((10, d)))
  ids = [f"doc{i}" for i in range(n)]
  # 300 vectors: brute force; more: a tree (see MUTABLE).
  params = _tree_params(n) if engine == "scann" and n > 300 else None
  return (VectorIndex.build(ids, x, step, engine=engine, params=params), ids, x)


def _exact_top(vectors, alive, queries, k):
  s = queries @ vectors.T
  s[:, ~alive] = -np.inf
  return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def _assert_consistent(index, queries, res):
  """Scores are the inner products with the returned rows, rows are live,
  best first, and ids name the rows."""
  for i, q in enumerate(queries):
    real = res.rows[i][res.rows[i] >= 0]
    assert len(real) == len(res.ids[i])
    assert [index.ids[r] for r in real] == res.ids[i]
    assert index.alive[real].all()
    np.testing.assert_allclose(
        res.scores[i, : len(real)], index.vectors[real] @ q, atol=1e-4
    )
    assert np.all(np.diff(res.scores[i, : len(real)]) <= 1e-5)


def _state(index, queries):
  res = index.search(queries, 5)
  return dict(
      ids=list(index.ids),
      row_of=dict(index.row_of),
      vectors=index.vectors.copy(),
      versions=index.versions.copy(),
      alive=index.alive.copy(),
      len=len(index),
      hits=res.ids,
      rows=res.rows.copy(),
  )


def _assert_same_state(a, b):
  assert a["ids"] == b["ids"]
  assert a["row_of"] == b["row_of"]
  np.testing.assert_array_equal(a["vectors"], b["vectors"])
  np.testing.assert_array_equal(a["versions"], b["versions"])
  np.testing.assert_array_equal(a["alive"], b["alive"])
  assert a["len"] == b["len"]
  assert a["hits"] == b["hits"]
  np.testing.assert_array_equal(a["rows"], b["rows"])


# -- ScaNN against exact search ------------------------------------------------


@pytest.fixture(scope="module")
def big():
  """20,000 clustered vectors (D=64, 150 clusters) in a ScaNN tree index,
  plus 300 held-out queries from the same clusters.

  The clusters overlap enough (noise 1.0) that the recall bound means
  something: searching a single leaf, or skipping the exact reorder, falls
  below 0.95 here.
  """
  rng = np.random.default_rng(1)
  d = 64
  centres = rng.standard_normal((150, d))
  x = _clustered(rng, 20_000, d, centres, noise=1.0)
  queries = _clustered(rng, 300, d, centres, noise=1.0)
  ids = [f"doc{i}" for i in range(x.shape[0])]
  return VectorIndex.build(ids, x, 0, engine="scann"), x, queries


def test_scann_recall_against_exact(big):
  index, x, queries = big
  assert index.params["kind"] == "tree_ah"
  assert index.params["num_leaves"] == round(20_000**0.5)
  exact = index.search(queries, 10, exact=True)
  # The exact path is itself right: a numpy brute force over the store.
  want, s = _exact_top(x, np.ones(len(x), bool), queries, 10)
  np.testing.assert_allclose(
      exact.scores, np.take_along_axis(s, want, 1), atol=1e-4
  )
  assert (
      np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.rows, want)])
      >= 0.999
  )
  approx = index.search(queries, 10)
  assert approx.rows.shape == (300, 10) and (approx.rows >= 0).all()
  recall = np.mean(
      [len(set(a) & set(b)) / 10 for a, b in zip(approx.rows, exact.rows)]
  )
  assert recall >= 0.95, recall
  # The approximate scores are reordered exactly: true inner products.
  _assert_consistent(
      index,
      queries[:50],
      SearchResult(approx.scores[:50], approx.rows[:50], approx.ids[:50]),
  )
  # The parallel (>= 64 queries) and sequential paths agree.
  few = index.search(queries[:10], 10)
  np.testing.assert_array_equal(few.rows, approx.rows[:10])


def test_exact_engine_matches_numpy():
  index, _, x = _small("exact", n=500)
  q = _unit(np.random.default_rng(5).standard_normal((20, D)))
  res = index.search(q, 7)
  want, s = _exact_top(x, np.ones(len(x), bool), q, 7)
  np.testing.assert_array_equal(res.rows, want)
  np.testing.assert_allclose(
      res.scores, np.take_along_axis(s, want, 1), atol=1e-5
  )
  assert res.ids == [[f"doc{r}" for r in row] for row in want]


def test_scann_params():
  assert scann_params(10) == {"kind": "brute_force", "num_neighbors": 10}
  assert scann_params(vindex.SCANN_TREE_MIN - 1, k=4) == {
      "kind": "brute_force",
      "num_neighbors": 4,
  }
  p = scann_params(vindex.SCANN_TREE_MIN)
  assert p["kind"] == "tree_ah"
  assert p["num_leaves"] == round(vindex.SCANN_TREE_MIN**0.5)
  for n, k in ((20_000, 10), (1_000_000, 20), (250_000, 5)):
    p = scann_params(n, k)
    assert p["kind"] == "tree_ah"
    assert p["num_neighbors"] == k
    assert abs(p["num_leaves"] - n**0.5) <= 1
    assert 8 <= p["num_leaves_to_search"] <= p["num_leaves"]
    assert (
        p["num_leaves_to_search"] < p["num_leaves"]
    )  # a tree, searched in part
    assert p["training_sample_size"] == min(n, 100_000)
    assert p["reorder"] == max(100, 10 * k)
  assert scann_params(1_000_000)["num_leaves"] == 1000


# -- mutations -----------------------------------------------------------------

# (engine, size): 300 is brute force for ScaNN, 2500 a tree.
MUTABLE = [("scann", 300), ("scann", 2500), ("exact", 300)]


@pytest.mark.parametrize("engine,n", MUTABLE)
def test_upsert_is_found_first(engine, n):
  index, ids, x = _small(engine, n=n)
  if engine == "scann":
    assert index.params["kind"] == ("tree_ah" if n > 300 else "brute_force")
  rng = np.random.default_rng(7)
  v_new, v_rep = _unit(rng.standard_normal((2, D)))
  index.upsert(["new", "doc5"], np.stack([v_new, v_rep]), step=7)
  assert "new" in index and "doc5" in index
  assert len(index) == n + 1
  res = index.search(np.stack([v_new, v_rep]), 5)
  assert res.ids[0][0] == "new" and res.ids[1][0] == "doc5"
  np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-4)
  _assert_consistent(
      index,
      np.stack([v_new, v_rep, x[5]]),
      index.search(np.stack([v_new, v_rep, x[5]]), 5),
  )
  np.testing.assert_array_equal(
      index.get(["doc5", "new"]), np.stack([v_rep, v_new])
  )
  assert index.versions[index.row_of["new"]] == 7
  assert index.versions[index.row_of["doc5"]] == 7
  others = [index.row_of[d] for d in ids if d != "doc5"]
  assert (index.versions[others] == 3).all()
  # The replaced vector is gone: its old self no longer scores 1.
  old = index.search(x[5][None], 3)
  assert not (
      "doc5" in old.ids[0] and old.scores[0, old.ids[0].index("doc5")] > 0.999
  )


@pytest.mark.parametrize("engine,n", MUTABLE)
def test_delete_then_upsert(engine, n):
  index, ids, x = _small(engine, n=n)
  row5 = index.row_of["doc5"]
  index.delete(["doc5", "doc9"])
  assert "doc5" not in index and "doc9" not in index and "doc4" in index
  assert len(index) == n - 2
  res = index.search(x[[5, 9, 4]], 20)
  for hits in res.ids:
    assert "doc5" not in hits and "doc9" not in hits
  assert res.ids[2][0] == "doc4"
  _assert_consistent(index, x[[5, 9, 4]], res)
  if n <= 300:  # everything live, for both engines
    res = index.search(x[[5]], n)
    assert len(res.ids[0]) == n - 2
    assert set(res.ids[0]) == set(ids) - {"doc5", "doc9"}
  with pytest.raises(KeyError, match="doc5"):
    index.get(["doc5"])
  with pytest.raises(KeyError, match="doc5"):
    index.delete(["doc5"])
  # Back again, in its old row, with the new step.
  w = _unit(np.random.default_rng(3).standard_normal((1, D)))
  index.upsert(["doc5"], w, step=9)
  assert "doc5" in index and len(index) == n - 1
  assert index.row_of["doc5"] == row5
  assert index.versions[row5] == 9
  res = index.search(w, 3)
  assert res.ids[0][0] == "doc5"
  assert res.scores[0, 0] == pytest.approx(1.0, abs=1e-4)
  assert "doc9" not in index.search(x[[9]], 20).ids[0]


def test_exact_engine_never_returns_dead_rows():
  index, ids, x = _small("exact", n=40)
  dead = [f"doc{i}" for i in range(0, 40, 3)]
  index.delete(dead)
  live = len(index)
  res = index.search(x, live)  # k == the live count: every live row
  assert (res.rows >= 0).all()
  assert index.alive[res.rows].all()
  for hits in res.ids:
    assert set(hits) == set(ids) - set(dead)


@pytest.mark.parametrize("engine", ENGINES)
def test_search_pads_past_the_live_count(engine):
  index, ids, x = _small(engine, n=6)
  index.delete(["doc2"])
  q = _unit(np.random.default_rng(4).standard_normal((3, D)))
  res = index.search(q, 10)
  assert res.rows.shape == (3, 10) and res.scores.shape == (3, 10)
  assert res.rows.dtype == np.int64 and res.scores.dtype == np.float32
  assert (res.rows[:, 5:] == -1).all()
  assert np.isneginf(res.scores[:, 5:]).all()
  assert (res.rows[:, :5] >= 0).all() and np.isfinite(res.scores[:, :5]).all()
  for hits in res.ids:
    assert len(hits) == 5
    assert set(hits) == set(ids) - {"doc2"}
  _assert_consistent(index, q, res)
  empty = index.search(np.zeros((0, D), np.float32), 4)
  assert empty.rows.shape == (0, 4) and empty.ids == []


@pytest.mark.parametrize("engine", ENGINES)
def test_rebuild_compacts(engine):
  index, ids, x = _small(engine, n=50)
  index.delete(["doc0", "doc7"])
  index.rebuild()
  assert len(index.ids) == 48 and index.alive.all()
  assert "doc0" not in index and "doc7" not in index
  assert index.ids == [d for d in ids if d not in ("doc0", "doc7")]
  np.testing.assert_array_equal(index.get(["doc8"]), x[[8]])
  res = index.search(x[[8, 49]], 1)
  assert res.ids == [["doc8"], ["doc49"]]


# -- persistence ---------------------------------------------------------------


@pytest.mark.parametrize("engine,n", MUTABLE)
def test_save_load_round_trip(engine, n, tmp_path):
  index, ids, x = _small(engine, n=n)
  rng = np.random.default_rng(11)
  index.upsert(["new", "doc1"], _unit(rng.standard_normal((2, D))), step=5)
  index.delete(["doc2"])
  path = tmp_path / "idx"
  index.save(path)
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temporary left behind
  meta = json.loads((path / "index.json").read_text())
  assert meta["engine"] == engine and meta["live"] == n
  loaded = VectorIndex.load(path)
  assert loaded.engine == engine and loaded.dim == D
  assert loaded.params == index.params
  assert loaded.ids == index.ids
  assert loaded.row_of == index.row_of
  np.testing.assert_array_equal(loaded.vectors, index.vectors)
  np.testing.assert_array_equal(loaded.versions, index.versions)
  np.testing.assert_array_equal(loaded.alive, index.alive)
  assert len(loaded) == len(index) and "doc2" not in loaded
  q = np.concatenate(
      [x[:20], index.get(["new", "doc1"]), _unit(rng.standard_normal((5, D)))]
  )
  a, b = index.search(q, 10), loaded.search(q, 10)
  assert a.ids == b.ids
  np.testing.assert_array_equal(a.rows, b.rows)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
  assert b.ids[20][0] == "new" and b.ids[21][0] == "doc1"
  # The loaded index keeps working: mutations after load.
  w = _unit(rng.standard_normal((1, D)))
  loaded.upsert(["doc2"], w, step=8)
  loaded.delete(["doc3"])
  res = loaded.search(np.concatenate([w, x[[3]]]), 5)
  assert res.ids[0][0] == "doc2" and "doc3" not in res.ids[1]
  assert loaded.versions[loaded.row_of["doc2"]] == 8


@pytest.mark.parametrize("engine", ENGINES)
def test_save_replaces_an_existing_index(engine, tmp_path):
  first, _, _ = _small(engine, n=30, seed=0)
  second, _, x2 = _small(engine, n=40, seed=1, step=4)
  second.delete(["doc39"])
  path = tmp_path / "idx"
  first.save(path)
  second.save(path)
  assert sorted(os.listdir(tmp_path)) == ["idx"]
  loaded = VectorIndex.load(path)
  assert loaded.ids == second.ids and len(loaded) == 39
  np.testing.assert_array_equal(loaded.vectors, x2)
  assert (loaded.versions == 4).all()
  assert loaded.search(x2[:5], 1).ids == [[f"doc{i}"] for i in range(5)]


def test_build_copies_and_failed_rebuild_changes_nothing():
  rng = np.random.default_rng(3)
  x = _unit(rng.standard_normal((50, D)))
  keep = x.copy()
  index = VectorIndex.build(
      [f"doc{i}" for i in range(50)], x, 0, engine="scann"
  )
  index.upsert(["doc1"], _unit(rng.standard_normal((1, D))), 1)
  np.testing.assert_array_equal(x, keep)  # the caller's array is untouched
  params = dict(index.params)
  with pytest.raises(ValueError, match="num_leaves"):
    index.rebuild(params={"kind": "tree_ah", "num_neighbors": 10})
  assert index.params == params
  assert index.search(x[[0, 2]], 1).ids == [["doc0"], ["doc2"]]  # still works


def test_float64_values_that_overflow_float32_are_refused():
  rng = np.random.default_rng(4)
  x = _unit(rng.standard_normal((20, D)))
  index = VectorIndex.build(
      [f"doc{i}" for i in range(20)], x, 0, engine="exact"
  )
  with pytest.raises(ValueError, match="non-finite"):
    index.upsert(["doc0"], np.full((1, D), 1e39), 1)
  np.testing.assert_array_equal(index.vectors, x)


def test_save_load_keeps_unusual_ids_exactly(tmp_path):
  ids = ["a", "b\x00", " c ", "d\u00e9"]
  x = np.eye(4, dtype=np.float32)
  index = VectorIndex.build(ids, x, 0, engine="scann")
  index.save(tmp_path / "idx")
  loaded = VectorIndex.load(tmp_path / "idx")
  assert loaded.ids == ids
  assert loaded.search(x, 1).ids == [[d] for d in ids]


def test_load_without_index_json(tmp_path):
  missing = tmp_path / "nothing"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    VectorIndex.load(missing)
  half = tmp_path / "half"
  half.mkdir()
  (half / "store.npz").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=re.escape(str(half))):
    VectorIndex.load(half)


# -- bad input -----------------------------------------------------------------


def _bad_calls(x):
  nan_rows = x[:2].copy()
  nan_rows[1, 3] = np.nan
  inf_q = x[:2].copy()
  inf_q[0, 0] = np.inf
  return [
      (
          "upsert wrong dim",
          lambda ix: ix.upsert(["new"], np.ones((1, D + 1), np.float32), 9),
          IndexInputError,
          re.escape(f"(1, {D + 1})"),
      ),
      (
          "upsert 1-d",
          lambda ix: ix.upsert(["new"], x[0], 9),
          IndexInputError,
          re.escape(f"({D},)"),
      ),
      (
          "upsert nan names doc",
          lambda ix: ix.upsert(["new", "doc4"], nan_rows, 9),
          IndexInputError,
          "'doc4'",
      ),
      (
          "upsert duplicate ids",
          lambda ix: ix.upsert(["doc1", "doc1"], x[:2], 9),
          IndexInputError,
          "duplicate document id 'doc1'",
      ),
      (
          "upsert count mismatch",
          lambda ix: ix.upsert(["new", "doc1"], x[:3], 9),
          IndexInputError,
          "2 ids",
      ),
      (
          "upsert non-str id",
          lambda ix: ix.upsert([3], x[:1], 9),
          IndexInputError,
          "int",
      ),
      ("delete unknown", lambda ix: ix.delete(["nope"]), KeyError, "'nope'"),
      (
          "delete known then unknown",
          lambda ix: ix.delete(["doc1", "nope"]),
          KeyError,
          "'nope'",
      ),
      (
          "delete duplicate",
          lambda ix: ix.delete(["doc1", "doc1"]),
          IndexInputError,
          "duplicate",
      ),
      (
          "delete everything",
          lambda ix: ix.delete([d for d in ix.ids if d in ix]),
          IndexInputError,
          "empty",
      ),
      (
          "search wrong dim",
          lambda ix: ix.search(np.ones((2, D - 1), np.float32)),
          IndexInputError,
          re.escape(f"(2, {D - 1})"),
      ),
      (
          "search nan",
          lambda ix: ix.search(nan_rows),
          IndexInputError,
          "non-finite",
      ),
      (
          "search inf",
          lambda ix: ix.search(inf_q),
          IndexInputError,
          "non-finite",
      ),
      ("search k=0", lambda ix: ix.search(x[:2], 0), IndexInputError, "k"),
  ]


_BAD_NAMES = [c[0] for c in _bad_calls(np.zeros((2, D), np.float32))]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", _BAD_NAMES)
def test_bad_input_leaves_index_unchanged(engine, case):
  index, ids, x = _small(engine, n=50)
  index.delete(["doc49"])  # a dead row too
  q = x[:8]
  before = _state(index, q)
  name, call, exc, match = next(c for c in _bad_calls(x) if c[0] == case)
  with pytest.raises(exc, match=match):
    call(index)
  _assert_same_state(before, _state(index, q))
  assert "doc1" in index and "new" not in index
  # ...and still usable afterwards.
  index.upsert(["new"], x[[0]], 10)
  assert index.search(x[[0]], 2).ids[0][0] in ("doc0", "new")


@pytest.mark.parametrize("engine", ENGINES)
def test_build_rejects_bad_corpora(engine):
  x = _unit(np.random.default_rng(0).standard_normal((4, D)))
  with pytest.raises(IndexInputError, match="empty"):
    VectorIndex.build([], np.zeros((0, D), np.float32), engine=engine)
  with pytest.raises(IndexInputError, match="duplicate document id 'a'"):
    VectorIndex.build(["a", "b", "a", "c"], x, engine=engine)
  bad = x.copy()
  bad[2, 1] = np.nan
  with pytest.raises(IndexInputError, match="'c'"):
    VectorIndex.build(["a", "b", "c", "d"], bad, engine=engine)
  with pytest.raises(IndexInputError, match=re.escape(f"({D},)")):
    VectorIndex.build(["a"], x[0], engine=engine)
  with pytest.raises(IndexInputError, match="3 ids"):
    VectorIndex.build(["a", "b", "c"], x, engine=engine)
  with pytest.raises(IndexInputError, match="unknown index engine"):
    VectorIndex.build(["a", "b", "c", "d"], x, engine="faiss")


def test_a_saved_index_never_unpickles(tmp_path):
  """ScaNN's own loader unpickles `scann_docids.pkl`; the index keeps its
  ids as JSON, writes no pickle, and never reads one: a pickle planted in a
  saved index (one that would create a file) does nothing, and the loaded
  index searches as the saved one did (rebuilt from the store where its
  JSON ids are gone)."""
  import pickle

  index, ids, x = _small("scann", n=300)
  index.upsert(
      ["new"], _unit(np.random.default_rng(4).standard_normal((1, D))), step=2
  )
  index.delete(["doc3"])
  path = tmp_path / "idx"
  index.save(path)
  sdir = path / "scann"
  assert not (sdir / "scann_docids.pkl").exists()
  assert json.loads((sdir / "scann_docids.json").read_text())
  want = index.search(x[:12], 5)

  planted = tmp_path / "planted"

  class Payload:

    def __reduce__(self):
      return (open, (str(planted), "w"))

  (sdir / "scann_docids.pkl").write_bytes(pickle.dumps(Payload()))
  got = VectorIndex.load(path).search(x[:12], 5)
  assert not planted.exists() and got.ids == want.ids
  (sdir / "scann_docids.json").unlink()
  with pytest.warns(UserWarning, match="never loaded"):
    rebuilt = VectorIndex.load(path)
  assert not planted.exists()
  assert rebuilt.search(x[:12], 5).ids == want.ids
