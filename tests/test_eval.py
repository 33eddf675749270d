"""The evaluation program (search_r3_jax/eval.py): on configs/eval.py:tiny
its files, its figures against the evaluator's own, and the corpus cache;
on a BEIR fixture folder its figures against a hand computation from its
own rankings, which are exact search over the model's embeddings; the
ScaNN engine."""

import json
import math
import pathlib

from conftest import load_config
import numpy as np
import pytest

from search_r3_jax import eval as eval_program
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.policy import Policy
from search_r3_jax.retrieval import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(model):
  cfg = load_config("eval", "tiny")
  cfg.model = str(model)
  return cfg


def test_eval_writes_its_files_and_reuses_the_corpus_embeddings(
    tiny_dir, tmp_path
):
  cfg = _config(tiny_dir)
  out = tmp_path / "eval"
  results = eval_program.evaluate(cfg, output=str(out))
  for name in ("results.json", "results.md", "samples.jsonl"):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / "results.json").read_text()) == json.loads(
      json.dumps(results)
  )
  assert set(results["rows"]) == {"reasoning off", "reasoning on", "BM25"}
  assert results["corpus_documents"] == 64
  assert results["queries"] == {"dev_sub": 8, "dev_top": 8}
  on = results["rows"]["reasoning on"]
  for split in ("dev_sub", "dev_top"):
    assert 0.0 <= on[f"{split}+reasoning/emitted"] <= 1.0
  samples = [json.loads(l) for l in (out / "samples.jsonl").open()]
  # 8 queries of 2 splits, reasoning off and on.
  assert len(samples) == 32
  assert {"reasoning", "emitted", "gold", "top", "hits"} <= set(samples[0])
  assert sum(s["emitted"] is None for s in samples) == 16
  assert all(
      len(s["hits"]) == 10 and s["top"] == s["hits"][0][0] for s in samples
  )
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  runs = sorted(p.name for p in (out / "runs").iterdir())
  assert runs == sorted(
      f"{split}.{tag}.trec" if tag else f"{split}.qrels"
      for split in ("dev_sub", "dev_top")
      for tag in ("reasoning-off", "reasoning-on", "bm25", None)
  )
  # Page titles are ids with spaces: one field each, as in Wikipedia's URLs.
  assert any(
      " " in d
      for d in evaluation.Evaluator.from_config(cfg.data, cfg.eval).doc_ids
  )
  lines = (out / "runs" / "dev_sub.bm25.trec").read_text().splitlines()
  assert len(lines) == 8 * 64  # every document ranked (fewer than 100)
  assert all(len(line.split()) == 6 for line in lines)
  qid, q0, doc, rank, score, tag = lines[0].split()
  assert (q0, rank, tag) == ("Q0", "1", "bm25") and float(score) > 0
  table = (out / "results.md").read_text()
  assert table.count("\n") == 5 and "| BM25 |" in table
  assert not results["timing"]["cache_hit"]

  # The reasoning-off figures are the evaluator's for the same model and
  # documents.
  mesh = shd.make_mesh(tuple(cfg.mesh))  # the program's mesh
  loaded = load_decoder(str(tiny_dir), mesh=mesh)
  policy = Policy.from_model(loaded.model, loaded.tokenizer, mesh)
  ev = evaluation.Evaluator.from_config(cfg.data, cfg.eval)
  want = ev.flat(policy, modes=(False,))
  for k, v in want.items():
    assert results["rows"]["reasoning off"][k] == pytest.approx(v, abs=1e-6), k

  # A second run with only the reasoning setting changed reads the cache.
  cfg.eval.reasoning = (False,)
  again = eval_program.evaluate(cfg, output=str(out))
  assert again["timing"]["cache_hit"]
  assert set(again["rows"]) == {"reasoning off", "BM25"}
  assert again["rows"]["reasoning off"] == results["rows"]["reasoning off"]


# ------------------------------------------------------------------ BEIR

BEIR_DOCS = {
    f"d{i}": (title, text)
    for i, (title, text) in enumerate(
        [
            ("Paris", "Paris is the capital of France."),
            ("Rome", "Rome is the capital of Italy."),
            ("Berlin", "Berlin is a city on the river Spree."),
            ("Seine", "The Seine is a river that flows through Paris."),
            ("Tiber", "The Tiber flows through Rome."),
            ("Alps", "The Alps are mountains in Europe."),
            ("Danube", "The Danube flows from Germany to the Black Sea."),
            ("Madrid", "Madrid is the capital of Spain."),
            ("Lisbon", "Lisbon lies on the Tagus estuary."),
            ("Vienna", "Vienna is on the Danube."),
            ("Prague", "Prague is crossed by the Vltava."),
            ("Oslo", "Oslo sits at the head of a fjord."),
            ("Athens", "Athens is among the oldest cities."),
            ("Warsaw", "Warsaw is on the Vistula."),
        ]
    )
}
BEIR_QUERIES = {
    "q1": "capital of France",
    "q2": "rivers of Rome",
    "q3": "cities on the Danube",
    "q4": "a query only the train qrels name",
}
# Graded: nDCG's gains are the grades.
BEIR_QRELS = {
    "q1": {"d0": 2, "d3": 1},
    "q2": {"d4": 2, "d1": 1},
    "q3": {"d9": 1, "d6": 1, "d13": 0},
}


@pytest.fixture
def beir_folder(tmp_path):
  folder = tmp_path / "beir"
  (folder / "qrels").mkdir(parents=True)
  (folder / "corpus.jsonl").write_text(
      "".join(
          json.dumps({"_id": d, "title": t, "text": x}) + "\n"
          for d, (t, x) in BEIR_DOCS.items()
      )
  )
  (folder / "queries.jsonl").write_text(
      "".join(
          json.dumps({"_id": q, "text": x}) + "\n"
          for q, x in BEIR_QUERIES.items()
      )
  )
  head = "query-id\tcorpus-id\tscore\n"
  (folder / "qrels" / "test.tsv").write_text(
      head
      + "".join(
          f"{q}\t{d}\t{g}\n"
          for q, rel in BEIR_QRELS.items()
          for d, g in rel.items()
      )
  )
  (folder / "qrels" / "train.tsv").write_text(head + "q4\td2\t1\n")
  return folder


def _read_run(path) -> dict[str, list[str]]:
  ranked = {}
  for line in path.read_text().splitlines():
    qid, _, doc, rank, _, _ = line.split()
    ranked.setdefault(qid, []).append(doc)
    assert int(rank) == len(ranked[qid])
  return ranked


def _by_hand(ranked: dict[str, list[str]]) -> dict[str, float]:
  """nDCG@10 (linear gains, log2 discounts) and Recall@10/100 (grade > 0
  relevant), averaged over the qrels' queries."""
  ndcg, r10, r100 = [], [], []
  for qid, rel in BEIR_QRELS.items():
    docs = ranked.get(qid, [])
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(docs[:10]))
    ideal = sorted(rel.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    ndcg.append(dcg / idcg)
    relevant = {d for d, g in rel.items() if g > 0}
    r10.append(len(relevant & set(docs[:10])) / len(relevant))
    r100.append(len(relevant & set(docs[:100])) / len(relevant))
  return {
      "ndcg@10": float(np.mean(ndcg)),
      "recall@10": float(np.mean(r10)),
      "recall@100": float(np.mean(r100)),
  }


def test_eval_on_a_beir_folder_matches_a_hand_computation(
    tiny_dir, beir_folder, tmp_path
):
  """`--config.data.path=DIR` evaluates the folder's test qrels (its train
  qrels are left alone); each setting's figures are those computed by hand
  from its TREC run, and the reasoning-off run is exact search over the
  model's own query and document embeddings."""
  cfg = _config(tiny_dir)
  cfg.data.path = str(beir_folder)
  cfg.data.data_dir = str(tmp_path / "tfds")
  cfg.eval.update(corpus_size=0, max_queries=0)
  out = tmp_path / "eval"
  results = eval_program.evaluate(cfg, output=str(out))
  assert results["data"]["name"] == "beir"
  assert results["splits"] == ["test"]
  assert results["queries"] == {"test": 3}
  assert results["corpus_documents"] == len(BEIR_DOCS)
  # The judgements beside the runs, as trec_eval reads them.
  qrels = {}
  for line in (out / "runs" / "test.qrels").read_text().splitlines():
    qid, zero, doc, grade = line.split()
    assert zero == "0"
    qrels.setdefault(qid, {})[doc] = int(grade)
  assert qrels == BEIR_QRELS
  for name, tag in eval_program.RUN_TAGS.items():
    ranked = _read_run(out / "runs" / f"test.{tag}.trec")
    assert sorted(ranked) == ["q1", "q2", "q3"]
    assert all(len(v) == len(BEIR_DOCS) for v in ranked.values())
    suffix = "+reasoning" if name == "reasoning on" else ""
    for metric, want in _by_hand(ranked).items():
      got = results["rows"][name][f"test{suffix}/{metric}"]
      assert got == pytest.approx(want, abs=1e-6), (name, metric)

  # The reasoning-off ranking is exact search with the model's embeddings.
  mesh = shd.make_mesh(tuple(cfg.mesh))
  loaded = load_decoder(str(tiny_dir), mesh=mesh)
  policy = Policy.from_model(loaded.model, loaded.tokenizer, mesh)
  ev = evaluation.Evaluator.from_config(
      eval_program.resolve_data(cfg).data, eval_program.resolve_data(cfg).eval
  )
  docs = ev.documents(policy)
  queries = ev.splits["test"].queries
  q = policy.encode_queries(list(queries.values()), progress=False)
  lines = (out / "runs" / "test.reasoning-off.trec").read_text().splitlines()
  hits = {}
  for line in lines:
    qid, _, doc, _, score, _ = line.split()
    hits.setdefault(qid, []).append((doc, float(score)))
  column = {d: j for j, d in enumerate(ev.doc_ids)}
  for qid, row in zip(queries, q @ docs.T):
    # Each hit's score is the dot product, and the scores are the best
    # ones in order (tied documents may come in either order).
    got = hits[qid]
    assert [s for _, s in got] == pytest.approx(np.sort(row)[::-1], abs=1e-5)
    for doc, score in got:
      assert score == pytest.approx(row[column[doc]], abs=1e-5)


def test_the_scann_engine_gives_the_exact_figures_on_a_small_corpus(
    tiny_dir, tmp_path
):
  """Below ScaNN's tree threshold its searcher is brute force: the same
  rankings and figures as exact search, through the ScaNN code path."""
  cfg = _config(tiny_dir)
  cfg.eval.reasoning = (False,)
  cfg.eval.bm25 = False
  exact = eval_program.evaluate(cfg, output=str(tmp_path / "exact"))
  cfg.eval.engine = "scann"
  scann = eval_program.evaluate(cfg, output=str(tmp_path / "scann"))
  assert scann["engine"] == "scann" and exact["engine"] == "exact"
  for k, v in exact["rows"]["reasoning off"].items():
    assert scann["rows"]["reasoning off"][k] == pytest.approx(v, abs=1e-5), k
  for split in ("dev_sub", "dev_top"):
    a = _read_run(tmp_path / "exact" / "runs" / f"{split}.reasoning-off.trec")
    b = _read_run(tmp_path / "scann" / "runs" / f"{split}.reasoning-off.trec")
    assert {q: v[:10] for q, v in a.items()} == {
        q: v[:10] for q, v in b.items()
    }
