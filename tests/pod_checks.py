"""Checks that run inside a local pod (`launch/local_pod.sh N -- python
tests/pod_checks.py NAME ARGS...`), started by tests/test_pod.py. Each prints
`ok NAME process i` when its assertions hold on that process."""

import json
import os
import sys

from absl import flags
import jax
import numpy as np

from search_r3_jax.core import distributed


def sharded_index(out_dir: str) -> None:
  """The sharded index against one index over the whole corpus."""
  from search_r3_jax.retrieval.index import IndexInputError
  from search_r3_jax.retrieval.index import VectorIndex
  from search_r3_jax.retrieval.sharded import ShardedIndex

  p, n = jax.process_index(), jax.process_count()
  rng = np.random.default_rng(7)
  size, dim = 53, 16
  ids = [f"doc{i:03d}" for i in range(size)]
  texts = [f"text of {d}" for d in ids]
  vectors = rng.normal(size=(size, dim)).astype(np.float32)
  # Ties across shards: the last document repeats the first, so both score
  # alike and the lower corpus row must win, as in one index.
  vectors[-1] = vectors[0]
  by_text = dict(zip(texts, vectors))
  encoded = []

  def encode(batch):
    encoded.extend(batch)
    return (
        np.stack([by_text[t] for t in batch])
        if batch
        else np.zeros((0, dim), np.float32)
    )

  index = ShardedIndex.build(ids, texts, encode, step=0, engine="exact")
  own = index.owned()
  assert encoded == [texts[ids.index(d)] for d in own], "built other shards"
  whole = VectorIndex.build(ids, vectors, 0, engine="exact")
  # Each process its own queries, of different numbers.
  queries = rng.normal(size=(11, dim)).astype(np.float32)
  queries[0] = vectors[0]
  mine = queries[p::n]
  for k in (1, 5, 40):
    got = index.search(mine, k)
    want = whole.search(mine, k)
    assert got.ids == want.ids, (k, got.ids, want.ids)
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)
  # The same queries on every process.
  got = index.search(queries, 7, per_process=False)
  assert got.ids == whole.search(queries, 7).ids
  # A refresh re-encodes only the process's own documents.
  encoded.clear()
  changed = ids[::4]
  for d in changed:
    by_text[texts[ids.index(d)]] = by_text[texts[ids.index(d)]] * 0.5
  count = index.refresh(
      changed, [texts[ids.index(d)] for d in changed], encode, 1
  )
  assert count == len([d for d in changed if d in own]), count
  assert encoded == [texts[ids.index(d)] for d in changed if d in own]
  counts = distributed.allgather(count)
  assert sum(counts) == len(changed), counts
  new = np.stack([by_text[t] for t in texts])
  whole = VectorIndex.build(ids, new, 1, engine="exact")
  assert index.search(mine, 9).ids == whole.search(mine, 9).ids
  # Saved per shard with a manifest; loading checks both.
  index.save(out_dir)
  again = ShardedIndex.load(out_dir, ids)
  assert again.search(mine, 9).ids == whole.search(mine, 9).ids
  try:
    ShardedIndex.load(out_dir, ids[:-1])
    raise AssertionError("a manifest of another corpus was accepted")
  except IndexInputError as e:
    assert "53 documents" in str(e) and "this corpus has 52" in str(e), e
  with open(os.path.join(out_dir, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["shards"] == n and manifest["size"] == size, manifest
  print(f"ok sharded_index process {p}", flush=True)


def sharded_environment(out_dir: str) -> None:
  """The stage-2 environment split over the processes: the same search as
  one environment over the whole corpus, marks and refreshes only in each
  process's block, saved per block and loaded back."""
  from search_r3_jax.retrieval.env_config import EnvConfig
  from search_r3_jax.retrieval.environment import RetrievalEnvironment
  from search_r3_jax.retrieval.index import IndexInputError
  from search_r3_jax.retrieval.sharded import ShardedEnvironment

  p, n = jax.process_index(), jax.process_count()
  rng = np.random.default_rng(3)
  size, dim = 41, 12
  corpus = {f"d{i:02d}": f"text {i}" for i in range(size)}
  base = rng.normal(size=(size, dim)).astype(np.float32)
  base /= np.linalg.norm(base, axis=1, keepdims=True)
  state = {"scale": 0.0}
  encoded = []

  def vec(text):
    i = int(text.split()[1])
    v = base[i] + state["scale"] * np.sin(np.arange(dim) + i)
    return v / np.linalg.norm(v)

  def encode(texts):
    encoded.extend(texts)
    return np.stack([vec(t) for t in texts]) if texts else np.zeros((0, dim))

  encode.collective = True
  cfg = EnvConfig(engine="exact", k=5, graph_k=3, drift_threshold=0.0)
  env = ShardedEnvironment(corpus, encode, cfg)
  block = env.doc_ids[env.rows]
  assert encoded == [corpus[d] for d in block], "encoded another block"
  whole = RetrievalEnvironment(corpus, None, cfg, vectors=base)
  queries = rng.normal(size=(6, dim)).astype(np.float32)
  got, want = env.search(queries), whole.search(queries)
  assert got.ids == want.ids, (got.ids, want.ids)
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)
  # Ids spread over blocks, then ids of one block only (the other sends
  # nothing), a repeated id among them.
  for ids in (["d00", "d40", "d17"], ["d01", "d00", "d01"]):
    np.testing.assert_allclose(
        env.embeddings(ids), whole.embeddings(ids), atol=1e-7
    )
  marked = env.observe(["d00", "d40"], [["d17"]])
  assert marked >= 3, marked
  assert set(np.asarray(env.local.doc_ids)[env.local.touched]) <= set(block)
  # The policy moved: each block re-encodes its own documents only.
  state["scale"] = 0.3
  encoded.clear()
  report = env.maybe_refresh(1, encode)
  assert set(encoded) <= {corpus[d] for d in block}, "refreshed another block"
  assert report["reencoded"] == sum(b["reencoded"] for b in report["blocks"])
  assert len(report["blocks"]) == n
  env.save(out_dir)
  again = ShardedEnvironment.load(out_dir, corpus)
  assert again.search(queries).ids == env.search(queries).ids
  try:
    ShardedEnvironment.load(out_dir, dict(corpus, extra="an extra document"))
    raise AssertionError("a manifest of another corpus was accepted")
  except IndexInputError as e:
    assert "41 documents" in str(e) and "this corpus has 42" in str(e), e
  print(f"ok sharded_environment process {p}", flush=True)


def per_process_encode(workdir: str) -> None:
  """Each process encodes its own documents; the embeddings equal the ones
  of every process encoding all of them."""
  from search_r3_jax.api import SearchR3

  p, n = jax.process_index(), jax.process_count()
  model = SearchR3.from_pretrained(workdir)
  docs = [f"document number {i} " * (1 + i % 7) for i in range(23)]
  mine = docs[p::n]
  got = model.policy.encode_documents(mine, batch_size=4, per_process=True)
  every = model.policy.encode_documents(docs, batch_size=4, progress=False)
  np.testing.assert_allclose(got, every[p::n], atol=1e-5)
  print(f"ok per_process_encode process {p} rows {len(mine)}", flush=True)


if __name__ == "__main__":
  name, args = sys.argv[1], sys.argv[2:]
  flags.FLAGS([sys.argv[0]])
  distributed.initialize()
  globals()[name](*args)
