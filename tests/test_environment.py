"""RetrievalEnvironment with a cheap synthetic encoder.

The encoder reads the document's row from its text ("text 17" -> row 17)
and returns unit(base[row] + shift[row]): `base` is a fixed clustered table,
`shift` is what a test moves to make the "policy" drift. It records every
text it is asked to encode.
"""

import collections
import math
import re

import numpy as np
import pytest

from search_r3_jax.retrieval.environment import EnvConfig
from search_r3_jax.retrieval.environment import kmeans
from search_r3_jax.retrieval.environment import RetrievalEnvironment

N, D = 400, 32
INF = float("inf")


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Encoder:
  """texts -> unit(base[row] + shift[row]), recording every text seen."""

  def __init__(self, base):
    self.base = np.asarray(base, np.float32)
    self.shift = np.zeros_like(self.base)
    self.calls = []

  def __call__(self, texts):
    texts = list(texts)
    self.calls.append(texts)
    return self.fresh(np.array([int(t.split()[1]) for t in texts], np.int64))

  def fresh(self, rows=None):
    if rows is None:
      rows = np.arange(self.base.shape[0])
    return _unit(self.base[rows] + self.shift[rows])

  def texts(self):
    return [t for c in self.calls for t in c]

  def reset(self):
    self.calls = []


def _corpus(n=N):
  return {f"doc{i}": f"text {i}" for i in range(n)}


def _make(n=N, seed=0, clusters=20, **cfg):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, D))
  base = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal(
      (n, D)
  )
  enc = Encoder(base)
  env = RetrievalEnvironment(_corpus(n), enc, EnvConfig(**cfg))
  enc.reset()
  return env, enc


def _stored(env):
  """Stored vectors in corpus order (env rows are index rows)."""
  return env.embeddings(env.doc_ids)


def _snapshot(env):
  return dict(
      vectors=env.index.vectors.copy(),
      versions=env.index.versions.copy(),
      ids=list(env.index.ids),
      touched=env.touched.copy(),
      refreshed_since=env.refreshed_since.copy(),
      regions=env.regions.copy(),
      centroids=env.centroids.copy(),
      graph=env.graph.copy(),
      step=env.step,
      last_full=env.last_full,
      reports=len(env.reports),
  )


def _assert_snapshot_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], np.ndarray):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    else:
      assert a[key] == b[key], key


def _assert_encoded_once(enc, n):
  texts = enc.texts()
  dup = [t for t, c in collections.Counter(texts).items() if c > 1]
  assert not dup, dup[:5]
  assert len(texts) == n


# -- build ---------------------------------------------------------------------


def test_build_encodes_everything_once_and_links_graph():
  rng = np.random.default_rng(0)
  enc = Encoder(rng.standard_normal((50, D)))
  env = RetrievalEnvironment(_corpus(50), enc, EnvConfig(graph_k=4), step=3)
  _assert_encoded_once(enc, 50)
  np.testing.assert_allclose(_stored(env), enc.fresh(), atol=1e-6)
  assert (env.index.versions == 3).all() and env.step == 3
  assert env.graph.shape == (50, 4)
  assert (env.graph >= 0).all()
  assert all(r not in env.graph[r] for r in range(50))
  assert not env.touched.any()
  res = env.search(enc.fresh()[:10])
  assert len(res.ids[0]) == env.cfg.k
  assert [h[0] for h in res.ids] == [f"doc{i}" for i in range(10)]


@pytest.mark.parametrize(
    "n,num_regions,want", [(N, 0, 20), (50, 0, 7), (130, 0, 11), (N, 5, 5)]
)
def test_regions(n, num_regions, want):
  env, enc = _make(n=n, num_regions=num_regions)
  assert want == (num_regions or round(math.sqrt(n)))
  assert env.centroids.shape == (want, D)
  assert env.regions.shape == (n,)
  assert env.regions.min() >= 0 and env.regions.max() < want
  np.testing.assert_allclose(
      np.linalg.norm(env.centroids, axis=1), 1.0, atol=1e-5
  )
  # Each document sits in the region of its nearest centroid.
  np.testing.assert_array_equal(
      env.regions, np.argmax(_stored(env) @ env.centroids.T, axis=1)
  )
  assert len(np.unique(env.regions)) > want // 2


def test_kmeans_is_a_fixed_point():
  rng = np.random.default_rng(3)
  centres = _unit(rng.standard_normal((4, D)))
  lab = np.repeat(np.arange(4), 30)
  x = _unit(centres[lab] + 0.05 * rng.standard_normal((120, D)))
  c, a = kmeans(x, 4, 10, seed=0)
  assert c.shape == (4, D) and a.shape == (120,) and a.dtype == np.int64
  np.testing.assert_array_equal(a, np.argmax(x @ c.T, axis=1))
  # Converged: each non-empty centroid is the normalised mean of its members
  # (a local optimum: the random start may still split one true cluster and
  # merge two others, so cluster purity is not asserted).
  for j in np.unique(a):
    np.testing.assert_allclose(c[j], _unit(x[a == j].sum(0)), atol=1e-5)
  # k is clamped to the number of points.
  c, a = kmeans(x[:3], 10, 5, seed=0)
  assert c.shape == (3, D)
  np.testing.assert_array_equal(np.sort(a), [0, 1, 2])


# -- threshold 0: a full refresh, one way or the other -------------------------


@pytest.mark.parametrize(
    "rebuild_fraction,kind", [(0.5, "full"), (2.0, "selective")]
)
def test_threshold_zero_refreshes_everything_once(rebuild_fraction, kind):
  env, enc = _make(drift_threshold=0.0, rebuild_fraction=rebuild_fraction)
  enc.shift = 0.5 * np.random.default_rng(1).standard_normal((N, D))
  before = _stored(env)
  assert np.abs(before - enc.fresh()).max() > 0.05  # it really drifted
  env.observe(["doc3"])
  report = env.refresh(5, enc)
  assert report["kind"] == kind
  assert report["reencoded"] == N and report["refreshed"] == N
  assert report["reencoded_fraction"] == 1.0
  # Every region, even one k-means left empty (no probe, NaN drift).
  assert report["drifted_regions"] == report["regions"]
  _assert_encoded_once(enc, N)
  assert set(enc.texts()) == set(_corpus().values())
  np.testing.assert_allclose(_stored(env), enc.fresh(), rtol=0, atol=1e-6)
  assert (env.index.versions == 5).all()
  assert env.step == 5 and not env.touched.any()
  assert report["since_rebuild_fraction"] == (0.0 if kind == "full" else 1.0)
  assert env.last_full == (5 if kind == "full" else 0)
  # The index answers with the fresh vectors.
  res = env.search(enc.fresh()[:30], k=1)
  assert [h[0] for h in res.ids] == [f"doc{i}" for i in range(30)]
  np.testing.assert_array_equal(
      env.regions, np.argmax(_stored(env) @ env.centroids.T, axis=1)
  )
  assert env.reports[-1] is report


# -- infinite threshold: nothing, unless touched -------------------------------


@pytest.mark.parametrize("probes", [2, 0])
def test_infinite_threshold_refreshes_nothing(probes):
  env, enc = _make(drift_threshold=INF, probes_per_region=probes)
  nreg = len(env.centroids)
  enc.shift = 0.5 * np.random.default_rng(2).standard_normal((N, D))
  before = _snapshot(env)
  report = env.refresh(4, enc)
  assert report["kind"] == "selective"
  assert report["refreshed"] == 0 and report["drifted_regions"] == 0
  np.testing.assert_array_equal(env.index.vectors, before["vectors"])
  np.testing.assert_array_equal(env.index.versions, before["versions"])
  assert (env.index.versions == 0).all()
  np.testing.assert_array_equal(env.graph, before["graph"])
  np.testing.assert_array_equal(env.regions, before["regions"])
  assert env.step == 4
  if probes:
    assert report["probed"] == report["reencoded"] > 0
    assert report["probed"] <= probes * nreg
    _assert_encoded_once(enc, report["probed"])
    assert report["drift_max"] > 0.01  # the drift was measured...
  else:
    assert report["probed"] == 0 and report["reencoded"] == 0
    assert enc.texts() == []
    assert math.isnan(report["drift_mean"])


# -- concentrated drift --------------------------------------------------------


def test_drift_in_two_regions_reencodes_those_regions_and_touched():
  env, enc = _make(drift_threshold=0.3, probes_per_region=3)
  sizes = np.bincount(env.regions, minlength=len(env.centroids))
  r1, r2 = np.argsort(-sizes)[:2]
  members = np.flatnonzero(np.isin(env.regions, [r1, r2]))
  rng = np.random.default_rng(4)
  enc.shift[members] = 10.0 * rng.standard_normal((members.size, D))
  # A touched document outside the drifted regions, and its neighbours.
  out = next(i for i in range(N) if env.regions[i] not in (r1, r2))
  env.observe([f"doc{out}"])
  touched = set(np.flatnonzero(env.touched))
  assert out in touched and len(touched) == 1 + env.cfg.graph_k
  expected = set(members) | touched
  assert len(expected) < 0.5 * N  # below the rebuild fraction
  before = _stored(env)
  report = env.refresh(6, enc)
  assert report["kind"] == "selective"
  assert report["drifted_regions"] == 2
  drift = np.array(report["region_drift"])
  assert drift[r1] >= 0.3 and drift[r2] >= 0.3
  assert np.nanmax(np.delete(drift, [r1, r2])) < 1e-5
  assert set(np.flatnonzero(env.index.versions == 6)) == expected
  assert report["refreshed"] == len(expected)
  assert report["touched"] == len(touched)
  # Each document encoded at most once, probes included.
  _assert_encoded_once(enc, report["reencoded"])
  assert {f"text {i}" for i in expected} <= set(enc.texts())
  rows = np.array(sorted(expected))
  rest = np.setdiff1d(np.arange(N), rows)
  after = _stored(env)
  np.testing.assert_allclose(after[rows], enc.fresh(rows), atol=1e-6)
  np.testing.assert_array_equal(after[rest], before[rest])
  assert (env.index.versions[rest] == 0).all()
  # Refreshed documents moved to their nearest centroid.
  np.testing.assert_array_equal(
      env.regions[rows], np.argmax(after[rows] @ env.centroids.T, axis=1)
  )


# -- observe -------------------------------------------------------------------


def _two_spreads(scale, threshold):
  """A tight cluster (rows < 100) and a spread one (rows >= 100), and the
  same small random displacement applied to every document."""
  rng = np.random.default_rng(7)
  centres = np.zeros((2, D))
  centres[0, 0] = centres[1, 1] = 1.0
  base = np.concatenate(
      [
          centres[0] + 0.01 * rng.standard_normal((100, D)),
          centres[1] + 0.3 * rng.standard_normal((100, D)),
      ]
  )
  enc = Encoder(_unit(base))
  env = RetrievalEnvironment(
      _corpus(200),
      enc,
      EnvConfig(
          num_regions=2,
          probes_per_region=4,
          drift_threshold=threshold,
          drift_scale=scale,
          rebuild_fraction=2.0,
          engine="exact",
      ),
  )
  enc.reset()
  enc.shift = 0.02 * rng.standard_normal((200, D))
  report = env.refresh(1, enc)
  tight = int(np.bincount(env.regions[:100], minlength=2).argmax())
  return env, report, tight


def test_neighbourhood_scale_refreshes_the_tight_region_only():
  env, report, tight = _two_spreads("neighbourhood", 0.5)
  spread = 1 - tight
  drift = np.array(report["region_drift"])
  radius = np.array(report["region_radius"])
  score = np.array(report["region_score"])
  # The same absolute drift (within 3x) in both regions ...
  assert drift[tight] < 3 * drift[spread] and drift[spread] < 3 * drift[tight]
  # ... is large next to the tight region's radius, small next to the other.
  assert radius[tight] < 0.05 * radius[spread]
  np.testing.assert_allclose(score, np.sqrt(drift / radius), rtol=1e-6)
  assert score[tight] >= 0.5 > score[spread]
  assert report["drifted_regions"] == 1
  refreshed = set(np.flatnonzero(env.index.versions == 1))
  assert refreshed == set(np.flatnonzero(env.regions == tight))


def test_absolute_scale_compares_one_minus_cos():
  env, report, _ = _two_spreads("absolute", 1e-4)
  drift = np.array(report["region_drift"])
  assert (drift >= 1e-4).all()
  np.testing.assert_array_equal(report["region_score"], drift)
  assert report["drifted_regions"] == 2
  assert (env.index.versions == 1).all()


def test_observe_marks_ids_and_graph_neighbours():
  env, enc = _make(touch_neighbors="all")
  gold = ["doc3"]
  retrieved = [["doc10", "doc11"], ["doc3", "doc12"]]
  marked = env.observe(gold, retrieved)
  rows = np.array([3, 10, 11, 12])
  want = set(rows) | set(env.graph[rows].ravel()) - {-1}
  assert set(np.flatnonzero(env.touched)) == want
  assert marked == len(want)
  # Marks accumulate; an unknown id raises and marks nothing.
  before = env.touched.copy()
  with pytest.raises(KeyError, match="nope"):
    env.observe(["doc20"], [["doc21", "nope"]])
  np.testing.assert_array_equal(env.touched, before)
  assert env.observe([]) == len(want)


def test_observe_without_neighbours():
  env, enc = _make(touch_neighbors="none")
  assert env.observe(["doc1", "doc7"], [["doc7", "doc9"]]) == 3
  assert set(np.flatnonzero(env.touched)) == {1, 7, 9}


def test_observe_marks_neighbours_of_gold_only_by_default():
  env, enc = _make()
  assert env.cfg.touch_neighbors == "gold"
  env.observe(["doc3"], [["doc10", "doc11"]])
  nb = set(env.graph[3]) - {-1}
  assert nb  # the fixture links every document
  assert set(np.flatnonzero(env.touched)) == {3, 10, 11} | nb


def test_bad_step_is_refused_before_anything_changes():
  env, enc = _make()
  env.observe(["doc3"])
  before = (_stored(env).copy(), env.index.versions.copy(), env.touched.copy())
  for bad, err in (("3", TypeError), (2.5, TypeError), (-1, ValueError)):
    with pytest.raises(err, match="step"):
      env.refresh(bad, enc)
  np.testing.assert_array_equal(_stored(env), before[0])
  np.testing.assert_array_equal(env.index.versions, before[1])
  np.testing.assert_array_equal(env.touched, before[2])
  assert not env.reports


def test_given_vectors_are_copied():
  env, _ = _make()
  start = _stored(env).copy()
  seeded = RetrievalEnvironment(
      _corpus(),
      vectors=start,
      cfg=EnvConfig(drift_threshold=0.0, rebuild_fraction=2.0),
  )
  enc = Encoder(np.ones_like(start))
  seeded.refresh(1, enc)
  np.testing.assert_array_equal(start, _stored(env))  # the caller's array


def test_search_with_k_zero_is_an_error():
  env, _ = _make()
  with pytest.raises(ValueError, match="k must be"):
    env.search(env.index.vectors[:1], k=0)


def test_touched_documents_are_refreshed_even_with_infinite_threshold():
  env, enc = _make(drift_threshold=INF, probes_per_region=2)
  enc.shift = 0.5 * np.random.default_rng(5).standard_normal((N, D))
  env.observe(["doc8"], [["doc30", "doc31"]])
  touched = np.flatnonzero(env.touched)
  assert touched.size > 3
  before = _stored(env)
  report = env.refresh(2, enc)
  assert not env.touched.any()
  assert report["touched"] == touched.size
  assert report["refreshed"] == touched.size
  np.testing.assert_array_equal(
      np.flatnonzero(env.index.versions == 2), touched
  )
  after = _stored(env)
  np.testing.assert_allclose(after[touched], enc.fresh(touched), atol=1e-6)
  rest = np.setdiff1d(np.arange(N), touched)
  np.testing.assert_array_equal(after[rest], before[rest])
  _assert_encoded_once(enc, report["reencoded"])
  # Marks are gone: the next refresh writes nothing.
  assert env.refresh(3, enc)["refreshed"] == 0
  assert (env.index.versions == 3).sum() == 0


# -- full refreshes: by fraction and by schedule -------------------------------


def test_rebuild_fraction_triggers_a_full_refresh():
  env, enc = _make(
      drift_threshold=INF,
      probes_per_region=0,
      touch_neighbors="none",
      rebuild_fraction=0.25,
  )
  first = [f"doc{i}" for i in range(80)]  # 20 %
  env.observe(first)
  r = env.refresh(1, enc)
  assert r["kind"] == "selective" and r["refreshed"] == 80
  assert r["since_rebuild_fraction"] == pytest.approx(0.2)
  env.observe(first)  # the same ones: still 20 %
  assert env.refresh(2, enc)["kind"] == "selective"
  env.observe([f"doc{i}" for i in range(80, 90)])  # 22.5 %: not past it
  assert env.refresh(3, enc)["kind"] == "selective"
  assert env.reports[-1]["since_rebuild_fraction"] == pytest.approx(0.225)
  enc.reset()
  env.observe([f"doc{i}" for i in range(90, 120)])  # would be 30 %
  r = env.refresh(4, enc)
  assert r["kind"] == "full"
  assert r["reencoded"] == N and r["refreshed"] == N
  _assert_encoded_once(enc, N)
  assert (env.index.versions == 4).all()
  assert r["since_rebuild_fraction"] == 0.0 and env.last_full == 4
  assert not env.refreshed_since.any()


def test_full_refresh_every_and_maybe_refresh():
  env, enc = _make(
      drift_threshold=INF, probes_per_region=1, full_refresh_every=3
  )
  kinds = [env.maybe_refresh(s, enc)["kind"] for s in range(1, 8)]
  assert kinds == [
      "selective",
      "selective",
      "full",
      "selective",
      "selective",
      "full",
      "selective",
  ]
  assert [r["step"] for r in env.reports] == list(range(1, 8))
  assert env.last_full == 6
  assert (env.index.versions == 6).all()
  # refresh_every: off-schedule steps do nothing at all.
  env, enc = _make(drift_threshold=0.0, refresh_every=3)
  before = _snapshot(env)
  for s in (1, 2, 4, 5):
    assert env.maybe_refresh(s, enc) is None
  _assert_snapshot_equal(before, _snapshot(env))
  assert enc.texts() == []
  r = env.maybe_refresh(6, enc)
  assert r is not None and r["step"] == 6 and env.step == 6
  assert (env.index.versions == 6).all()


def test_full_flag_forces_a_rebuild():
  env, enc = _make(drift_threshold=INF, probes_per_region=0)
  enc.shift = 0.3 * np.random.default_rng(6).standard_normal((N, D))
  r = env.refresh(2, enc, full=True)
  assert r["kind"] == "full" and r["refreshed"] == N
  np.testing.assert_allclose(_stored(env), enc.fresh(), atol=1e-6)


# -- graph links after a selective refresh -------------------------------------


def test_selective_refresh_relinks_with_exact_neighbours():
  env, enc = _make(
      engine="exact",
      drift_threshold=INF,
      probes_per_region=0,
      touch_neighbors="none",
      graph_k=6,
  )
  rows = np.arange(0, N, 7)
  enc.shift[rows] = 3.0 * np.random.default_rng(7).standard_normal(
      (rows.size, D)
  )
  old_graph = env.graph.copy()
  env.observe([f"doc{i}" for i in rows])
  r = env.refresh(1, enc)
  assert r["kind"] == "selective" and r["refreshed"] == rows.size
  stored = env.index.vectors
  changed = 0
  for i in rows:
    s = stored @ stored[i]
    s[i] = -np.inf
    want = np.argsort(-s, kind="stable")[:6]
    links = env.graph[i]
    assert i not in links and (links >= 0).all()
    # The links are the top 6 by score, best first (ties aside).
    np.testing.assert_allclose(s[links], s[want], atol=1e-6)
    assert len(set(links) & set(want)) >= 5
    changed += not np.array_equal(links, old_graph[i])
  assert changed > rows.size // 2  # the drift really moved them
  untouched = np.setdiff1d(np.arange(N), rows)
  np.testing.assert_array_equal(env.graph[untouched], old_graph[untouched])


# -- bad encoders --------------------------------------------------------------


def _nan_for(enc, doc_row):
  def encode(texts):
    out = enc(texts).copy()
    for i, t in enumerate(texts):
      if t == f"text {doc_row}":
        out[i] = np.nan
    return out

  return encode


@pytest.mark.parametrize("rebuild_fraction", [0.5, 2.0])
@pytest.mark.parametrize("bad_row", [7, 123])
def test_nan_encoding_names_document_and_changes_nothing(
    rebuild_fraction, bad_row
):
  env, enc = _make(drift_threshold=0.0, rebuild_fraction=rebuild_fraction)
  enc.shift = 0.5 * np.random.default_rng(8).standard_normal((N, D))
  env.observe(["doc2"], [["doc40"]])
  before = _snapshot(env)
  with pytest.raises(ValueError, match=f"'doc{bad_row}'"):
    env.refresh(3, _nan_for(enc, bad_row))
  _assert_snapshot_equal(before, _snapshot(env))
  assert env.touched.any()
  # A good encoder afterwards still works.
  r = env.refresh(3, enc)
  np.testing.assert_allclose(_stored(env), enc.fresh(), atol=1e-6)
  assert r["refreshed"] == N


def test_wrong_dimension_encoding_raises_and_changes_nothing():
  env, enc = _make(drift_threshold=0.0)
  env.observe(["doc5"])
  before = _snapshot(env)

  def wide(texts):
    return np.concatenate(
        [enc(texts), np.zeros((len(texts), 1), np.float32)], axis=1
    )

  with pytest.raises(ValueError, match="dimension"):
    env.refresh(2, wide)
  _assert_snapshot_equal(before, _snapshot(env))

  def short(texts):
    return enc(texts)[:-1]

  with pytest.raises(ValueError, match="shape"):
    env.refresh(2, short)
  _assert_snapshot_equal(before, _snapshot(env))


def test_nan_at_build_names_document():
  rng = np.random.default_rng(0)
  enc = Encoder(rng.standard_normal((20, D)))
  with pytest.raises(ValueError, match="'doc11'"):
    RetrievalEnvironment(_corpus(20), _nan_for(enc, 11))


# -- configuration -------------------------------------------------------------


def test_empty_corpus_and_config_errors():
  enc = Encoder(np.ones((1, D)))
  with pytest.raises(ValueError, match="non-empty corpus"):
    RetrievalEnvironment({}, enc)
  assert enc.calls == []
  with pytest.raises(ValueError, match=r"\['bogus', 'zzz'\]"):
    EnvConfig.from_mapping({"engine": "exact", "zzz": 1, "bogus": 2})
  cfg = EnvConfig.from_mapping(
      {"engine": "exact", "graph_k": 3, "drift_threshold": INF}
  )
  assert cfg == EnvConfig(engine="exact", graph_k=3, drift_threshold=INF)
  for bad in (
      {"engine": "faiss"},
      {"k": 0},
      {"drift_threshold": -0.1},
      {"drift_threshold": float("nan")},
      {"probes_per_region": -1},
      {"rebuild_fraction": -1.0},
  ):
    with pytest.raises(ValueError, match=next(iter(bad))):
      EnvConfig.from_mapping(bad)


# -- persistence ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ["scann", "exact"])
def test_save_load_round_trip(engine, tmp_path):
  env, enc = _make(engine=engine, drift_threshold=INF, probes_per_region=1)
  enc.shift = 0.5 * np.random.default_rng(9).standard_normal((N, D))
  env.observe(["doc1", "doc2"])
  env.refresh(2, enc)  # some versions differ now
  env.observe(["doc50"], [["doc60"]])  # marks pending at save time
  path = tmp_path / "env"
  env.save(path)
  loaded = RetrievalEnvironment.load(path, _corpus())
  assert loaded.cfg == env.cfg
  assert loaded.doc_ids == env.doc_ids and loaded.texts == env.texts
  assert loaded.step == env.step == 2 and loaded.last_full == env.last_full
  np.testing.assert_array_equal(loaded.graph, env.graph)
  np.testing.assert_array_equal(loaded.regions, env.regions)
  np.testing.assert_array_equal(loaded.centroids, env.centroids)
  np.testing.assert_array_equal(loaded.touched, env.touched)
  np.testing.assert_array_equal(loaded.refreshed_since, env.refreshed_since)
  np.testing.assert_array_equal(loaded.index.vectors, env.index.vectors)
  np.testing.assert_array_equal(loaded.index.versions, env.index.versions)
  q = _unit(np.random.default_rng(10).standard_normal((15, D)))
  assert loaded.search(q).ids == env.search(q).ids
  assert loaded.search(q, 3).ids == env.search(q, 3).ids
  # A later refresh works on the loaded environment.
  pending = np.flatnonzero(loaded.touched)
  assert pending.size > 2
  enc.reset()
  r = loaded.refresh(5, enc)
  assert r["refreshed"] == pending.size
  np.testing.assert_array_equal(
      np.flatnonzero(loaded.index.versions == 5), pending
  )
  np.testing.assert_allclose(
      loaded.embeddings([loaded.doc_ids[i] for i in pending]),
      enc.fresh(pending),
      atol=1e-6,
  )
  assert not loaded.touched.any()
  res = loaded.search(enc.fresh(pending), k=1)
  assert [h[0] for h in res.ids] == [f"doc{i}" for i in pending]
  full = loaded.refresh(6, enc, full=True)
  assert full["kind"] == "full"
  np.testing.assert_allclose(_stored(loaded), enc.fresh(), atol=1e-6)


def test_load_checks_the_corpus(tmp_path):
  env, enc = _make(n=30)
  path = tmp_path / "env"
  env.save(path)
  corpus = _corpus(30)
  del corpus["doc3"]
  with pytest.raises(ValueError, match="doc3"):
    RetrievalEnvironment.load(path, corpus)
  corpus = _corpus(30)
  corpus["docX"] = "text 0"
  with pytest.raises(ValueError, match="docX"):
    RetrievalEnvironment.load(path, corpus)
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no"))):
    RetrievalEnvironment.load(tmp_path / "no", _corpus(30))
  # The same corpus in another order loads in the saved order.
  shuffled = dict(reversed(list(_corpus(30).items())))
  loaded = RetrievalEnvironment.load(path, shuffled)
  assert loaded.doc_ids == env.doc_ids


def test_save_replaces_an_existing_environment(tmp_path):
  env, enc = _make(n=60)
  path = tmp_path / "env"
  env.save(path)
  env.observe(["doc4"])
  env.refresh(3, enc)
  env.save(path)
  loaded = RetrievalEnvironment.load(path, _corpus(60))
  assert loaded.step == 3
  assert (loaded.index.versions == 3).sum() == env.reports[-1]["refreshed"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]


# -- with a real (tiny, random) model on the 8-device mesh ---------------------


def test_refresh_with_a_model_encoder_on_a_mesh(eight_device_mesh):
  from search_r3_jax import SearchR3
  from search_r3_jax.retrieval.environment import document_encoder

  shape = dict(
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      head_dim=32,
  )
  a = SearchR3.random(seed=0, mesh=eight_device_mesh, **shape)
  words = [
      "river",
      "mountain",
      "violin",
      "protein",
      "comet",
      "harbour",
      "glacier",
      "sonnet",
      "enzyme",
      "volcano",
      "orchid",
      "falcon",
  ]
  corpus = {
      f"d{i}": f"A short note about the {w}, number {i}."
      for i, w in enumerate(words * 3)
  }
  texts = list(corpus.values())
  enc_a = document_encoder(a, max_length=16, batch_size=8)
  env = RetrievalEnvironment(
      corpus, enc_a, EnvConfig(engine="exact", graph_k=4)
  )
  np.testing.assert_allclose(
      env.index.vectors,
      a.encode_documents(texts, max_length=16, progress=False),
      atol=1e-5,
  )
  # The same parameters: no drift, nothing written.
  report = env.refresh(1, enc_a)
  assert report["drift_max"] < 1e-5 and report["refreshed"] == 0
  assert (env.index.versions == 0).all()
  # Other parameters: every region drifted, everything re-encoded.
  b = SearchR3.random(seed=1, mesh=eight_device_mesh, **shape)
  report = env.refresh(2, document_encoder(b, max_length=16, batch_size=8))
  assert report["drifted_regions"] == report["regions"]
  assert report["reencoded"] == len(corpus)
  assert (env.index.versions == 2).all()
  np.testing.assert_allclose(
      env.index.vectors,
      b.encode_documents(texts, max_length=16, progress=False),
      atol=1e-5,
  )


def test_start_from_given_vectors():
  env, enc = _make()
  start = _stored(env) + 0.0
  seeded = RetrievalEnvironment(
      _corpus(), cfg=EnvConfig(), vectors=start, step=3
  )
  np.testing.assert_array_equal(seeded.index.vectors, start)
  assert (seeded.index.versions == 3).all()
  np.testing.assert_array_equal(seeded.graph, env.graph)
  with pytest.raises(ValueError, match="either encode or vectors"):
    RetrievalEnvironment(_corpus(), enc, vectors=start)
  with pytest.raises(ValueError, match="for 400 documents"):
    RetrievalEnvironment(_corpus(), vectors=start[:10])
  bad = start.copy()
  bad[7, 0] = np.nan
  with pytest.raises(ValueError, match="doc7"):
    RetrievalEnvironment(_corpus(), vectors=bad)
