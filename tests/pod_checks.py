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
