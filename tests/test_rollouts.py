"""Rollout sampling and the GRPO batch layout."""

import numpy as np
import pytest

from search_r3_jax.training import rollouts as rl


def test_sample_groups_and_embeddings(tiny):
  out = rl.sample(
      tiny,
      ["where is rome", "the river"],
      group_size=3,
      max_new_tokens=5,
      temperature=1.0,
      seed=1,
  )
  assert out.size == 6
  np.testing.assert_array_equal(out.query_index, [0, 0, 0, 1, 1, 1])
  assert out.prompts[0] == out.prompts[2] != out.prompts[3]
  eid = tiny.tokenizer.embed_token_id
  for i in range(6):
    resp = out.responses[i]
    assert 1 <= len(resp) <= 5
    if out.has_embed[i]:
      assert resp[-1] == eid
      np.testing.assert_allclose(
          np.linalg.norm(out.embeddings[i]), 1.0, rtol=1e-5
      )
    else:
      assert eid not in resp
      assert not out.embeddings[i].any()
  # Sampling differs within a group (5 tokens from a random model).
  assert len({tuple(r) for r in out.responses[:3]}) > 1
  with pytest.raises(ValueError, match="group_size"):
    rl.sample(tiny, ["x"], group_size=0, max_new_tokens=3)


def test_grpo_batch_layout_appends_the_missing_embed_token():
  r = rl.Rollouts(
      query_index=np.array([0, 0]),
      prompts=[[5, 6, 7], [5, 6, 7]],
      responses=[[11, 12, 99], [13, 2]],  # 99: embed, 2: eos
      has_embed=np.array([True, False]),
      embeddings=np.zeros((2, 4), np.float32),
      texts=["", ""],
  )
  b = rl.grpo_batch(r, embed_token_id=99, pad_id=0, seq_len=8, end_ids=(2,))
  # The eos the second rollout ended with gives way to the embed token, as
  # in evaluation; `targets` keeps it where it was sampled.
  np.testing.assert_array_equal(
      b["tokens"], [[5, 6, 7, 11, 12, 99, 0, 0], [5, 6, 7, 13, 99, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
      b["targets"], [[5, 6, 7, 11, 12, 99, 0, 0], [5, 6, 7, 13, 2, 0, 0, 0]]
  )
  np.testing.assert_array_equal(b["lengths"], [6, 5])
  np.testing.assert_array_equal(b["embed_pos"], [5, 4])
  # The loss sees the sampled tokens only (the eos among them): not the
  # appended embed token.
  np.testing.assert_array_equal(
      b["mask"], [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
  )
  with pytest.raises(ValueError, match="rollout 0 has 6 tokens"):
    rl.grpo_batch(r, embed_token_id=99, pad_id=0, seq_len=5)


def test_score_searches_rewards_and_normalises_by_group():
  from search_r3_jax.retrieval.environment import EnvConfig
  from search_r3_jax.retrieval.environment import RetrievalEnvironment

  d = 8
  docs = np.eye(d, dtype=np.float32)  # doc i = axis i
  corpus = {f"doc{i}": f"text {i}" for i in range(d)}
  env = RetrievalEnvironment(
      corpus, cfg=EnvConfig(engine="exact", graph_k=2), vectors=docs
  )
  q = np.zeros((4, d), np.float32)
  q[0] = docs[2]  # gold doc2 at rank 1
  q[1] = 0.8 * docs[5] + 0.6 * docs[2]  # doc2 at rank 2
  q[2] = docs[7]  # gold not in top 3
  r = rl.Rollouts(
      query_index=np.array([0, 0, 0, 0]),
      prompts=[[1]] * 4,
      responses=[[2]] * 4,
      has_embed=np.array([True, True, True, False]),
      embeddings=q,
      texts=[""] * 4,
  )
  out = rl.score(env, r, [["doc2"]], group_size=4, k=3)
  np.testing.assert_array_equal(out["best_rank"], [1, 2, 0, 0])
  assert out["retrieved"][0][0] == "doc2" and out["retrieved"][3] == []
  # 1/log2(1 + rank) + 0.1 cos, and -1 without an embed token.
  want = np.array([1.0 + 0.1, 1 / np.log2(3) + 0.1 * 0.6, 0.0, -1.0])
  np.testing.assert_allclose(out["reward"], want, rtol=1e-5)
  adv = (want - want.mean()) / (want.std() + 1e-6)
  np.testing.assert_allclose(out["advantages"], adv, rtol=1e-4)
  with pytest.raises(ValueError, match="gold lists"):
    rl.score(env, r, [["doc2"], ["doc3"]], group_size=4)
  with pytest.raises(KeyError, match="nope"):
    rl.score(env, r, [["nope"]], group_size=4)
