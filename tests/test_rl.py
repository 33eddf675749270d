"""Stage 2 (rl.py): its pieces, and the program end to end on
configs/rl.py:tiny over a toy BEIR folder: the reward rises where the right
answer is learnable, outputs, resume after kill -9 at the same step, query
position and environment, and the non-finite guard (a NaN loss, and an
exploding update whose loss was still finite, stop the run cleanly)."""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

from conftest import load_config
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from search_r3_jax.retrieval.environment import EnvConfig
from search_r3_jax.retrieval.environment import RetrievalEnvironment
from search_r3_jax.training import rollouts
from search_r3_jax.training import stage2 as rl
from search_r3_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_qrels(path, rows):
  path.write_text(
      "query-id\tcorpus-id\tscore\n"
      + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
  )


def exact_env(vectors):
  corpus = {f"doc{i}": f"text {i}" for i in range(len(vectors))}
  return RetrievalEnvironment(
      corpus,
      cfg=EnvConfig(engine="exact", graph_k=2),
      vectors=np.asarray(vectors, np.float32),
  )


def unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x)


# ------------------------------------------------------------ QueryStream


PAIRS = [(f"q{i}", (f"d{i}",)) for i in range(7)]


def test_query_stream_is_seeded_and_covers_every_pair_once_per_epoch():
  a, b = rl.QueryStream(PAIRS, seed=3), rl.QueryStream(PAIRS, seed=3)
  got = a.next(21)
  assert got == b.next(5) + b.next(9) + b.next(7)  # same order, any chunks
  for e in range(3):  # each epoch is a permutation of all the pairs
    epoch = got[7 * e : 7 * e + 7]
    assert sorted(epoch) == sorted(PAIRS), e
  # A fresh order every epoch, and another one for another seed.
  assert got[:7] != got[7:14] or got[7:14] != got[14:]
  assert rl.QueryStream(PAIRS, seed=4).next(21) != got
  # Asking for more than an epoch at once wraps around.
  assert rl.QueryStream(PAIRS, seed=3).next(10) == got[:10]


def test_query_stream_state_round_trip_continues_identically():
  s = rl.QueryStream(PAIRS, seed=0)
  s.next(5)
  state = json.loads(json.dumps(s.get_state()))  # as a checkpoint holds it
  assert state == {"epoch": 0, "cursor": 5, "size": 7}
  rest = s.next(12)
  t = rl.QueryStream(PAIRS, seed=0)
  t.set_state(state)
  assert t.next(12) == rest
  # At an epoch's end the state still names that epoch; the next call wraps.
  u = rl.QueryStream(PAIRS, seed=0)
  u.next(7)
  assert u.get_state() == {"epoch": 0, "cursor": 7, "size": 7}
  v = rl.QueryStream(PAIRS, seed=0)
  v.set_state(u.get_state())
  assert v.next(3) == u.next(3) == rl.QueryStream(PAIRS, 0).next(10)[7:]


def test_query_stream_refuses_a_state_of_another_size():
  s = rl.QueryStream(PAIRS, seed=0)
  s.next(3)
  with pytest.raises(ValueError, match="7 training queries.*has 6"):
    rl.QueryStream(PAIRS[:6], seed=0).set_state(s.get_state())
  with pytest.raises(ValueError, match="None training queries"):
    rl.QueryStream(PAIRS, seed=0).set_state({"epoch": 0, "cursor": 0})


# ------------------------------------------------------- training_queries


@pytest.fixture
def judged_beir(tmp_path):
  folder = tmp_path / "judged"
  (folder / "qrels").mkdir(parents=True)
  write_jsonl(
      folder / "corpus.jsonl",
      [
          {"_id": f"d{i}", "title": "", "text": f"document {i}"}
          for i in range(1, 6)
      ],
  )
  write_jsonl(
      folder / "queries.jsonl",
      [{"_id": f"q{i}", "text": f"query {i}"} for i in range(1, 6)],
  )
  write_qrels(
      folder / "qrels" / "train.tsv",
      [
          ("q1", "d1", 1),
          ("q1", "d2", 0),
          ("q1", "d3", 2),  # d2: not relevant
          ("q2", "d4", 1),  # d4 is left out of the corpus below
          ("q3", "d4", 1),
          ("q3", "d5", 1),
          ("q4", "d2", 0),  # judged, but nothing relevant
      ],
  )
  write_qrels(folder / "qrels" / "dev.tsv", [("q5", "d1", 1)])
  return folder


def _data_cfg(folder, tmp_path, split="train"):
  return ml_collections.ConfigDict(
      dict(
          name="beir",
          path=str(folder),
          data_dir=str(tmp_path / "tfds"),
          split=split,
          num_negatives=1,
      )
  )


def test_training_queries_from_judged_qrels(judged_beir, tmp_path):
  corpus = {d: f"document {d}" for d in ("d1", "d2", "d3", "d5")}
  got = rl.training_queries(_data_cfg(judged_beir, tmp_path), corpus)
  # Gold: judged with score > 0 and in the corpus, in qrels order; q2 (its
  # only gold is not in the corpus) and q4 (nothing relevant) are dropped.
  assert got == [("query 1", ("d1", "d3")), ("query 3", ("d5",))]
  # A BEIR query has no kind: `kinds` (wiki_fanout's) filters nothing.
  assert (
      rl.training_queries(
          _data_cfg(judged_beir, tmp_path), corpus, kinds=("title",)
      )
      == got
  )
  # Any judged split will do.
  assert rl.training_queries(
      _data_cfg(judged_beir, tmp_path, "dev"), corpus
  ) == [("query 5", ("d1",))]


def test_training_queries_refuses_splits_without_gold(judged_beir, tmp_path):
  corpus = {"d1": "document 1"}
  with pytest.raises(ValueError, match="split 'corpus'.*gold documents"):
    rl.training_queries(_data_cfg(judged_beir, tmp_path, "corpus"), corpus)
  with pytest.raises(ValueError, match="no split 'test'"):
    rl.training_queries(_data_cfg(judged_beir, tmp_path, "test"), corpus)
  with pytest.raises(ValueError, match="split 'train': no training query"):
    rl.training_queries(
        _data_cfg(judged_beir, tmp_path), {"d2": "document 2"}
    )  # judged with score 0 only


# -------------------------------------------------------------- rollouts


def _rollouts(has_embed, embeddings, prompts=None, responses=None):
  n = len(has_embed)
  return rollouts.Rollouts(
      query_index=np.zeros((n,), np.int64),
      prompts=prompts or [[1]] * n,
      responses=responses or [[2]] * n,
      has_embed=np.asarray(has_embed, bool),
      embeddings=np.asarray(embeddings, np.float32),
      texts=[""] * n,
  )


def test_grpo_batch_appends_a_multi_token_suffix_outside_the_loss():
  r = _rollouts(
      [True, False, False],
      np.zeros((3, 4)),
      prompts=[[5, 6, 7], [5, 6, 7], [5]],
      responses=[[11, 12, 99], [13, 2], [14]],
  )  # 99: embed, 2: eos
  b = rollouts.grpo_batch(
      r,
      embed_token_id=99,
      pad_id=0,
      seq_len=9,
      suffix=[40, 41, 99],
      end_ids=(2,),
  )
  np.testing.assert_array_equal(
      b["tokens"],
      [
          [5, 6, 7, 11, 12, 99, 0, 0, 0],  # emitted: no suffix
          [5, 6, 7, 13, 40, 41, 99, 0, 0],  # the eos gives way to the suffix
          [5, 14, 40, 41, 99, 0, 0, 0, 0],  # the budget ran out
      ],
  )
  np.testing.assert_array_equal(b["targets"][1, :5], [5, 6, 7, 13, 2])
  np.testing.assert_array_equal(b["targets"][[0, 2]], b["tokens"][[0, 2]])
  np.testing.assert_array_equal(b["lengths"], [6, 7, 5])
  np.testing.assert_array_equal(b["embed_pos"], [5, 6, 4])  # its last token
  assert all(b["tokens"][i, p] == 99 for i, p in enumerate(b["embed_pos"]))
  # The loss sees the sampled tokens only, never the suffix.
  np.testing.assert_array_equal(
      b["mask"],
      [
          [0, 0, 0, 1, 1, 1, 0, 0, 0],
          [0, 0, 0, 1, 1, 0, 0, 0, 0],
          [0, 1, 0, 0, 0, 0, 0, 0, 0],
      ],
  )
  # The suffix counts towards seq_len.
  with pytest.raises(ValueError, match="rollout 1 has 8 tokens"):
    rollouts.grpo_batch(
        r, embed_token_id=99, pad_id=0, seq_len=7, suffix=[40, 41, 99]
    )  # without end ids the eos stays
  for bad in ([40, 99, 41], [40, 41], []):
    with pytest.raises(ValueError, match="does not end with the embed token"):
      rollouts.grpo_batch(r, embed_token_id=99, pad_id=0, seq_len=9, suffix=bad)


def test_embed_suffix_is_cut_after_the_token():
  from search_r3_jax.core.prompts import PromptConfig

  class FakeTokenizer:
    embed_token_id = 99

    def encode(self, text):
      self.text = text
      return [7, 8, 99, 9]  # " The embedding is", <|embed_token|>, "."

  tok = FakeTokenizer()
  assert rl.embed_suffix(tok, PromptConfig()) == [7, 8, 99]
  assert tok.text == " The embedding is <|embed_token|>."


def test_score_fallback_searches_rows_without_the_token():
  docs = np.eye(8, dtype=np.float32)  # doc i = axis i
  env = exact_env(docs)
  second = unit(0.8 * docs[5] + 0.6 * docs[2])  # doc2 at rank 2, cos 0.6
  # What the rollouts carry (rows 2, 3 emitted no token: zeros) and what the
  # forward over prompt + response + suffix gave for every row.
  carried = np.stack([docs[7], second, np.zeros(8), np.zeros(8)])
  forward = np.stack([docs[2], second, docs[2], second])
  r = _rollouts([True, True, False, False], carried)
  out = rollouts.score(
      env, r, [["doc2"]], group_size=4, k=3, embeddings=forward
  )
  dcg2 = 1 / math.log2(3)
  # rank + 0.1 cos for everyone, -1 where no token was emitted.
  want = np.array([1 + 0.1, dcg2 + 0.06, 1 + 0.1 - 1, dcg2 + 0.06 - 1])
  np.testing.assert_allclose(out["reward"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      out["terms"]["dcg_rank"], [1, dcg2, 1, dcg2], rtol=1e-5
  )
  np.testing.assert_allclose(
      out["terms"]["cosine"], [1, 0.6, 1, 0.6], rtol=1e-5
  )
  np.testing.assert_array_equal(out["terms"]["format"], [0, 0, -1, -1])
  np.testing.assert_array_equal(out["best_rank"], [1, 2, 1, 2])
  # Every row was searched with the forward's embedding (row 0's carried
  # doc7 would have missed).
  assert [ids[0] for ids in out["retrieved"]] == [
      "doc2",
      "doc5",
      "doc2",
      "doc5",
  ]
  adv = (want - want.mean()) / (want.std() + 1e-6)
  np.testing.assert_allclose(out["advantages"], adv, rtol=1e-4, atol=1e-5)

  # The format weight scales the penalty of the fallback rows.
  heavy = rollouts.score(
      env,
      r,
      [["doc2"]],
      group_size=4,
      k=3,
      weights={"dcg_rank": 1.0, "cosine": 0.1, "format": 2.0},
      embeddings=forward,
  )
  np.testing.assert_allclose(
      heavy["reward"], want - [0, 0, 1, 1], rtol=1e-5, atol=1e-6
  )

  # Without embeddings (the paper's rule): the penalty alone, nothing
  # searched; the emitted rows are scored with what they carry.
  paper = rollouts.score(env, r, [["doc2"]], group_size=4, k=3)
  np.testing.assert_allclose(
      paper["reward"], [0.0, dcg2 + 0.06, -1, -1], rtol=1e-5, atol=1e-6
  )
  assert paper["retrieved"][2] == paper["retrieved"][3] == []
  np.testing.assert_array_equal(paper["best_rank"], [0, 2, 0, 0])
  np.testing.assert_array_equal(paper["terms"]["format"], [0, 0, -1, -1])

  with pytest.raises(ValueError, match=r"embeddings of shape \(3, 8\)"):
    rollouts.score(env, r, [["doc2"]], group_size=4, embeddings=forward[:3])


def test_aux_documents_put_the_gold_first_and_no_gold_among_negatives():
  docs = np.eye(8, dtype=np.float32)
  env = exact_env(docs)
  emb = np.stack(
      [
          unit([0.9, 0.4, 0.3, 0.2, 0.1, 0, 0, 0]),
          unit([0, 0, 0, 0, 0, 1.0, 0.5, 0.25]),
      ]
  )
  # Row 0: two gold documents, the first of them ranked second; row 1: one.
  gold = [["doc1", "doc0"], ["doc5"]]
  out = rl.aux_documents(env, emb, gold, k=3)
  assert out.shape == (2, 3, 8)
  np.testing.assert_array_equal(out[0], docs[[1, 2, 3]])  # doc0 skipped
  np.testing.assert_array_equal(out[1], docs[[5, 6, 7]])
  # 8 documents, 2 of them gold: 6 negatives at most.
  with pytest.raises(
      ValueError, match="6 non-gold documents for row 0, 7 " "needed"
  ):
    rl.aux_documents(env, emb, gold, k=8)


def test_rollout_metrics_bins_ranks():
  r = _rollouts(
      [True, True, False, True],
      np.zeros((4, 2)),
      responses=[[1, 2], [1], [1, 2, 3], [4, 5, 6, 7]],
  )
  sc = {
      "reward": np.array([1.0, 0.5, -1.0, 0.0]),
      "best_rank": np.array([1, 3, 0, 7]),
      "terms": {"format": np.array([0, 0, -1, 0])},
  }
  m = rl.rollout_metrics(r, sc, group_size=2, max_new_tokens=3)
  assert m["reward_mean"] == pytest.approx(0.125)
  # The one rollout without the token used its whole budget of 3 tokens;
  # the 4-token one emitted it.
  assert m["budget_rate"] == 0.25
  assert rl.rollout_metrics(r, sc, 2, max_new_tokens=4)["budget_rate"] == 0
  assert m["reward_group_std"] == pytest.approx((0.25 + 0.5) / 2)
  assert m["embed_rate"] == 0.75 and m["reasoning_tokens"] == 2.5
  assert m["reward_format"] == -0.25
  assert (m["rank_1"], m["rank_2_3"], m["rank_4_10"], m["rank_miss"]) == (
      0.25,
      0.25,
      0.25,
      0.25,
  )


# ------------------------------------------------- the program, end to end
#
# A toy BEIR folder: 12 documents, each about a made-up word; the training
# queries are four of those words (train qrels), the dev queries other
# phrasings. All runs use configs/rl.py:tiny (a random 2-layer model with
# SmolLM2's tokenizer) on the 8 fake CPU devices of conftest: the resume
# runs on the config's mesh (1, -1, 1), fsdp 8 (the parameters and optimizer
# state sharded, saved and restored); the others on (-1, 1, 1), data 8,
# about 3.5x faster a step on 2 cores. Every rollout batch is Q * G = 8 rows,
# which both split.

WORDS = (
    "zorblat",
    "quimble",
    "frandor",
    "plinth",
    "mexado",
    "truvik",
    "golbin",
    "snarfle",
    "veltro",
    "kaprim",
    "droshen",
    "wumble",
)
COLOURS = ("red", "blue", "green", "small", "large", "old")
THINGS = ("fish", "bird", "tree", "stone")
XLA_FLAGS = "--xla_force_host_platform_device_count=8"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """(BEIR folder, TFDS data_dir) shared by the module's runs."""
  root = tmp_path_factory.mktemp("toy")
  folder = root / "toy_words"
  (folder / "qrels").mkdir(parents=True)
  write_jsonl(
      folder / "corpus.jsonl",
      [
          {
              "_id": f"d{i}",
              "title": w,
              "text": f"{w}: the {w} is a {COLOURS[i % 6]} {THINGS[i % 4]} that "
              f"lives in the lake of {w}.",
          }
          for i, w in enumerate(WORDS)
      ],
  )
  write_jsonl(
      folder / "queries.jsonl",
      [{"_id": f"t{i}", "text": w} for i, w in enumerate(WORDS)]
      + [
          {"_id": f"v{i}", "text": f"what is a {w}?"}
          for i, w in enumerate(WORDS)
      ],
  )
  write_qrels(
      folder / "qrels" / "train.tsv", [(f"t{i}", f"d{i}", 1) for i in range(4)]
  )
  write_qrels(
      folder / "qrels" / "dev.tsv",
      [(f"v{i}", f"d{i}", 1) for i in (0, 1, 2, 5)],
  )
  return folder, root / "tfds"


def _toy_overrides(toy, **extra):
  folder, data_dir = toy
  out = {
      "data.name": "beir",
      "data.path": str(folder),
      "data.data_dir": str(data_dir),
      "data.split": "train",
      "data.query_kinds": (),
      "eval.splits": ("dev",),
      "eval.corpus_size": 0,
      "eval.max_queries": 0,
      "train_corpus.size": 0,
      # Stage 2 alone, from the random model: it never emits the token, so
      # the rollouts are searched at the appended suffix.
      "stage1_first": False,
      "rl.fallback_reward": True,
      "env.engine": "exact",
      "mesh": (-1, 1, 1),
      # 4 queries x 2 rollouts: every step sees every training query, so
      # step means compare like with like; one reasoning token (a random
      # model writes noise), 3 results scored.
      "rl.queries_per_step": 4,
      "rl.group_size": 2,
      "rl.max_new_tokens": 1,
      "env.k": 3,
  }
  out.update(extra)
  return out


def tiny_config(overrides):
  return load_config("rl", "tiny", overrides)


def _flag(value):
  return repr(value) if isinstance(value, tuple) else str(value)


def _cmd(workdir, overrides):
  return [
      sys.executable,
      "-m",
      "search_r3_jax.train",
      f"--config={ROOT / 'configs' / 'rl.py'}:tiny",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={_flag(v)}" for k, v in overrides.items()]


def _rows(workdir, kind="train"):
  with open(workdir / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _train_rows(workdir):
  """step -> its train row; every step must be logged exactly once."""
  rows = _rows(workdir)
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
  return {r["step"]: r for r in rows}


# Learning: the index is frozen at the step-0 document vectors
# (env.refresh_every past the run), so each training query has a fixed right
# answer that the policy's embedding can learn. (With the default refresh
# the random model drifts to a collapse instead: its final states are nearly
# collinear at init, mean document cosine 0.96, and the query-side auxiliary
# InfoNCE against re-encoded documents pushes every embedding the same way;
# measured on 24 such documents over 20-30 steps: cosine 0.99 to 1.0, dev
# nDCG@10 0.63 -> 0.12-0.41, rewards rising no more than their noise.) The
# random model never emits <|embed_token|>, so every reward is the fallback
# one: 1/log2(1 + rank) within the top 3 + 0.1 cos - 1. Auxiliary InfoNCE
# weight 1: the config's 0.1 learns too, about half as fast (every query at
# rank 1 only at step 23 of 24).
LEARN_STEPS = 24
WINDOW = 4


def _learn_overrides(toy, **extra):
  return _toy_overrides(
      toy,
      **{
          "total_steps": LEARN_STEPS,
          "env.refresh_every": 1000,
          "loss.aux_weight": 1.0,
          "eval_every": 12,
          "checkpoint_every": 12,
          **extra,
      },
  )


@pytest.fixture(scope="module")
def learned(toy, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("learn")
  assert len(jax.devices()) == 8, "conftest's XLA_FLAGS must give 8 devices"
  last_eval = trainer.train(
      tiny_config(_learn_overrides(toy)), str(workdir), rl.Stage2
  )
  return workdir, last_eval


def test_reward_rises_where_the_answer_is_learnable(learned, toy):
  workdir, _ = learned
  rows = _train_rows(workdir)
  assert sorted(rows) == list(range(LEARN_STEPS))
  reward = np.array([rows[s]["reward_mean"] for s in range(LEARN_STEPS)])
  rank_1 = np.array([rows[s]["rank_1"] for s in range(LEARN_STEPS)])
  first, last = reward[:WINDOW].mean(), reward[-WINDOW:].mean()
  print(f"reward by step: {np.round(reward, 3).tolist()}")

  # The same steps (same queries, same sampling seeds) with learning rate 0:
  # the policy never changes, and every step scores all four queries, so a
  # window's mean moves only with the sampled reasoning tokens. Measured:
  # -0.37 and -0.34 (two queries at rank 1, two at rank >= 2 or missed),
  # while learning goes from -0.41 to +0.08, every query at rank 1 from step
  # 13 on (on seeds 0, 1 and 2, over 30 steps, from step 10-15).
  cfg = tiny_config(_learn_overrides(toy, **{"optimizer.learning_rate": 0.0}))
  loop = rl.Stage2(cfg)
  loop.build_env()
  n = len(loop.stream.pairs)
  still = {}
  for s in [*range(WINDOW), *range(LEARN_STEPS - WINDOW, LEARN_STEPS)]:
    done = s * loop.nq
    loop.stream.set_state({"epoch": done // n, "cursor": done % n, "size": n})
    still[s] = loop.step(s)["reward_mean"]
  assert still[0] == pytest.approx(reward[0], abs=1e-5)  # same start
  still_first = np.mean([still[s] for s in range(WINDOW)])
  still_last = np.mean(
      [still[s] for s in range(LEARN_STEPS - WINDOW, LEARN_STEPS)]
  )
  print(
      f"lr 0: first {still_first:.3f} last {still_last:.3f}; "
      f"learning: first {first:.3f} last {last:.3f}"
  )
  # The margin below is out of reach without learning...
  assert still_last < still_first + 0.3
  # ...and learning clears it, against its own start and against lr 0.
  assert last > first + 0.3
  assert last > still_last + 0.3
  assert rank_1[-WINDOW:].mean() >= 0.75


def test_outputs(learned):
  workdir, last_eval = learned
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["stage"] == 2 and cfg["total_steps"] == LEARN_STEPS
  rows = _train_rows(workdir)
  assert sorted(rows) == list(range(LEARN_STEPS))
  for step, row in rows.items():
    for k in (
        "reward_mean",
        "reward_std",
        "embed_rate",
        "kl",
        "clip_fraction",
        "reasoning_tokens",
        "rank_1",
        "rank_miss",
        "time_rollout",
        "time_update",
        "time_refresh",
        "loss",
        "grad_norm",
        "aux_infonce",
        "lr",
    ):
      assert k in row and np.isfinite(row[k]), (step, k)
    assert row["reasoning_tokens"] == 1.0 and 0 <= row["embed_rate"] <= 1
    assert sum(
        row[k] for k in ("rank_1", "rank_2_3", "rank_4_10", "rank_miss")
    ) == pytest.approx(1.0)
  evals = {r["step"]: r for r in _rows(workdir, "eval")}
  assert sorted(evals) == [0, 12, 24]
  for row in evals.values():
    for k in (
        "dev/ndcg@10",
        "dev+reasoning/ndcg@10",
        "dev/recall@10",
        "dev+reasoning/recall@10",
    ):
      assert 0 <= row[k] <= 1, k
    assert row["dev/queries"] == row["dev+reasoning/queries"] == 4
  assert last_eval["dev/ndcg@10"] == pytest.approx(evals[24]["dev/ndcg@10"])
  for name in ("train.png", "eval.png"):
    assert (workdir / "plots" / name).stat().st_size > 1000, name
  assert any((workdir / "tb").iterdir())
  for step in (0, 12, 24):
    samples = [
        json.loads(l) for l in open(workdir / "samples" / f"step_{step}.jsonl")
    ]
    assert [s["query_id"] for s in samples] == ["v0", "v1", "v2", "v5"]
    assert all(
        s["split"] == "dev"
        and s["gold"] == [f"d{s['query_id'][1:]}"]
        and s["top"].startswith("d")
        for s in samples
    )
  ckpts = sorted(
      int(p.name)
      for p in (workdir / "checkpoints").iterdir()
      if p.name.isdigit()
  )
  assert ckpts == [12, 24]
  assert sorted(os.listdir(workdir / "env")) == ["12", "24"]
  # The saved environment and query position belong together.
  env = RetrievalEnvironment.load(
      workdir / "env" / "24", {f"d{i}": "" for i in range(12)}
  )
  assert env.size == 12


# Resume: the environment refreshes every step, and only what the step
# touched (no region counts as drifted, no full rebuild), so its vectors are
# a mix of versions that only its saved state can reproduce: the resumed run
# must restore it as well as the train state and the query position.
RESUME_STEPS = 6


def _resume_overrides(toy):
  return _toy_overrides(
      toy,
      **{
          "mesh": (1, -1, 1),
          "rl.queries_per_step": 2,
          "rl.group_size": 4,
          "rl.max_new_tokens": 2,
          "env.drift_threshold": 1e9,
          "env.rebuild_fraction": 1.0,
          "total_steps": RESUME_STEPS,
          "checkpoint_every": 2,
          "eval_every": 100,
      },
  )


def _run(workdir, overrides, check=True):
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS)
  return subprocess.run(
      _cmd(workdir, overrides),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=check,
  )


@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory):
  """An uninterrupted run: the reference for the resumed one."""
  workdir = tmp_path_factory.mktemp("straight")
  trainer.train(tiny_config(_resume_overrides(toy)), str(workdir), rl.Stage2)
  return workdir


def test_resume_after_kill_9_continues_exactly(straight, toy, tmp_path):
  overrides = _resume_overrides(toy)
  proc = subprocess.Popen(
      _cmd(tmp_path, overrides),
      cwd=ROOT,
      env=dict(os.environ, XLA_FLAGS=XLA_FLAGS),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  marker = tmp_path / "checkpoints" / "2" / "commit_success.txt"
  deadline = time.time() + 300
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), "the run never reached its step-2 checkpoint"
  killed_at = max(_train_rows(tmp_path))
  assert killed_at < RESUME_STEPS - 1, "the run finished before the kill"
  assert (tmp_path / "env" / "2" / "environment.json").exists()

  out = _run(tmp_path, overrides)
  assert "resumed from" in out.stderr + out.stdout
  want, got = _train_rows(straight), _train_rows(tmp_path)
  assert sorted(got) == list(range(RESUME_STEPS))
  assert all(row["refresh_full"] == 0 for row in want.values())  # selective
  assert min(row["refresh_fraction"] for row in want.values()) < 1
  # Same state, query position, environment and seeds: the same steps.
  for step in range(RESUME_STEPS):
    for k in (
        "loss",
        "reward_mean",
        "reward_std",
        "aux_infonce",
        "kl",
        "grad_norm",
        "rank_1",
        "refresh_reencoded",
    ):
      assert got[step][k] == pytest.approx(want[step][k], rel=1e-5, abs=1e-6), (
          step,
          k,
      )
  assert [r["step"] for r in _rows(tmp_path, "eval")] == [0, RESUME_STEPS]
  assert _rows(tmp_path, "eval")[-1]["dev/ndcg@10"] == pytest.approx(
      _rows(straight, "eval")[-1]["dev/ndcg@10"], rel=1e-5
  )
  ckpts = sorted(
      int(p.name)
      for p in (tmp_path / "checkpoints").iterdir()
      if p.name.isdigit()
  )
  assert ckpts == [4, 6]  # keep_checkpoints = 2
  assert sorted(os.listdir(tmp_path / "env")) == ["4", "6"]


def _copy_run(src, dst):
  """A copy of a finished run's workdir (checkpoints 4 and 6, env 4 and 6)
  to resume with other settings."""
  import shutil

  shutil.copytree(src, dst)
  return dst


def _restored_params_are_finite(workdir, step):
  from search_r3_jax.training import checkpoint

  ck = checkpoint.Checkpointer(workdir)
  try:
    assert ck.latest_step() == step
    leaves = jax.tree.leaves(ck.manager.restore(step)["state"])
  finally:
    ck.close()
  return bool(leaves) and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_non_finite_loss_stops_with_last_checkpoint_intact(
    straight, toy, tmp_path
):
  """A loss that turns NaN (here: an InfoNCE temperature of 0) stops the run
  at its first update, before anything is saved, with the guard's message
  and a non-zero exit; the latest checkpoint restores, finite."""
  workdir = _copy_run(straight, tmp_path / "run")
  overrides = _resume_overrides(toy)
  overrides.update(
      {"total_steps": RESUME_STEPS + 2, "checkpoint_every": 1, "loss.tau": 0.0}
  )
  out = _run(workdir, overrides, check=False)
  assert out.returncode != 0
  err = out.stderr.lower()
  assert "loss is nan" in err or "loss is inf" in err, out.stderr[-2000:]
  assert f"is intact: step {RESUME_STEPS}" in out.stderr
  assert "Traceback" not in out.stderr  # a message, not a crash
  assert _restored_params_are_finite(workdir, RESUME_STEPS)
  assert max(_train_rows(workdir)) == RESUME_STEPS - 1  # nothing logged


def test_exploding_update_stops_with_the_guard(straight, toy, tmp_path):
  """The test_train.py scenario: learning rate 1e12 without clipping."""
  from search_r3_jax.training.runtime import NonFiniteLossError

  workdir = _copy_run(straight, tmp_path / "run")
  overrides = _resume_overrides(toy)
  overrides.update(
      {
          "total_steps": RESUME_STEPS + 2,
          "checkpoint_every": 1,
          "optimizer.learning_rate": 1e12,
          "optimizer.clip_norm": 1e30,
      }
  )
  with pytest.raises(NonFiniteLossError) as e:
    trainer.train(tiny_config(overrides), str(workdir), rl.Stage2)
  assert f"is intact: step {RESUME_STEPS}" in str(e.value)
  assert "updated parameters' forward is not finite" in str(e.value)
  # Nothing from the exploded update was saved.
  assert _restored_params_are_finite(workdir, RESUME_STEPS)


def test_resumes_a_workdir_written_before_an_environment_field(
    straight, toy, tmp_path
):
  """A workdir whose config.json predates `env.shard_by_process` resumes
  (the field's default is how it ran), and its next step is taken."""
  workdir = _copy_run(straight, tmp_path / "run")
  cfg = json.loads((workdir / "config.json").read_text())
  del cfg["env"]["shard_by_process"]
  (workdir / "config.json").write_text(json.dumps(cfg))
  overrides = _resume_overrides(toy)
  overrides.update({"total_steps": RESUME_STEPS + 1})
  trainer.train(tiny_config(overrides), str(workdir), rl.Stage2)
  assert sorted(_train_rows(workdir)) == list(range(RESUME_STEPS + 1))
  # config.json now records the field.
  assert (
      json.loads((workdir / "config.json").read_text())["env"][
          "shard_by_process"
      ]
      is False
  )


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rl.group_size", 1, "rl.group_size must be >= 2"),
        ("rl.inner_epochs", 0, "rl.inner_epochs must be >= 1"),
        ("rl.max_new_tokens", 0, "rl.max_new_tokens must be >= 1"),
        ("rl.aux_documents", 1, "rl.aux_documents must be >= 2"),
        ("rl.top_p", 0.0, "rl.top_p in"),
    ],
)
def test_check_config_names_the_field(field, value, message):
  cfg = load_config("rl", "tiny")
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(ValueError, match=message):
    rl.check_config(cfg)
  rl.check_config(load_config("rl", "tiny"))  # the shipped variants pass
  rl.check_config(load_config("rl"))


def test_training_and_evaluation_embed_one_token_sequence(tiny):
  """A rollout that did not emit the token is trained on the token sequence
  evaluation embeds the same response from (`tokenizer.reasoning_row`): the
  analysis, its end-of-turn dropped, then the embed suffix. The GRPO
  forward's embedding equals `encode_queries`' for the same greedy
  responses."""
  from search_r3_jax.core.tokenizer import reasoning_row
  from search_r3_jax.training import grpo

  policy = tiny.policy
  tok = policy.tokenizer
  queries = ["paris city", "the river in rome", "old stone bridge"]
  want, details = policy.encode_queries(
      queries,
      reasoning=True,
      max_new_tokens=5,
      temperature=0.0,
      return_details=True,
      progress=False,
  )
  ro = rollouts.sample(
      policy, queries, group_size=1, max_new_tokens=5, temperature=0.0
  )
  assert [d.analysis for d in details] == [tok.decode(r) for r in ro.responses]
  assert not any(d.emitted for d in details) and not ro.has_embed.any()
  # One more rollout that ended with end-of-turn after two tokens.
  eot = tok.end_of_turn_id
  ro = dataclasses.replace(
      ro,
      query_index=np.arange(4),
      prompts=ro.prompts + [ro.prompts[0]],
      responses=ro.responses + [ro.responses[0][:2] + [eot]],
      has_embed=np.zeros(4, bool),
      embeddings=np.zeros((4, ro.embeddings.shape[1]), np.float32),
      texts=ro.texts + [""],
      logprobs=ro.logprobs + [[0.0] * 3],
  )
  suffix = rl.embed_suffix(tok, policy.prompts)
  host = rollouts.grpo_batch(
      ro,
      embed_token_id=tok.embed_token_id,
      pad_id=tok.pad_id,
      seq_len=96,
      suffix=suffix,
      end_ids=tok.eos_ids,
  )
  row = list(host["tokens"][3, : host["lengths"][3]])
  assert row == ro.prompts[0] + ro.responses[0][:2] + suffix
  n_prompt = len(ro.prompts[0])
  assert eot not in row[n_prompt:] and host["targets"][3, n_prompt + 2] == eot
  _, emb = grpo.policy_outputs(
      policy.graphdef,
      policy.params,
      jnp.asarray(host["tokens"]),
      jnp.asarray(host["lengths"]),
      jnp.asarray(host["embed_pos"]),
      targets=jnp.asarray(host["targets"]),
  )
  emb = np.asarray(emb)
  np.testing.assert_allclose(emb[:3], want, atol=1e-5)
  eval_row, emitted = reasoning_row(
      ro.prompts[3],
      ro.responses[3],
      embed_token_id=tok.embed_token_id,
      end_ids=tok.eos_ids,
      suffix=suffix,
  )
  assert eval_row == row and not emitted
  np.testing.assert_allclose(
      emb[3], policy.embed_ids([eval_row], 1, False, "")[0], atol=1e-5
  )
