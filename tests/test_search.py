"""Searching a user's documents: `SearchR3.index` / `DocumentIndex`
against exact search over the same embeddings, save and load, a model of
another width refused; the readers of JSONL, BEIR and text folders and
their errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from search_r3_jax import SearchR3
from search_r3_jax.data.common import DataError
from search_r3_jax.retrieval.documents import DocumentIndex
from search_r3_jax.retrieval.documents import read_documents
from search_r3_jax.retrieval.index import IndexInputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [
    {"_id": "fr", "title": "france", "text": "paris is the capital of france"},
    {"_id": "it", "title": "rome", "text": "rome is a city on a river"},
    {"_id": "de", "title": "berlin", "text": "berlin is the capital city"},
    {"_id": "q", "text": "what is a search query embedding"},
    {"_id": "w", "text": "where and when is the document"},
]
QUERIES = ["the capital of france", "a city on a river", "search embedding"]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _exact_top(model, docs, queries, k=3):
  # A title goes on its own line unless the text starts with it.
  texts = [
      x["text"]
      if not x.get("title") or x["text"].startswith(x["title"])
      else f"{x['title']}\n{x['text']}"
      for x in docs
  ]
  d = model.encode_documents(texts, progress=False)
  q = model.encode_queries(queries, progress=False)
  order = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :k]
  return [[docs[j]["_id"] for j in row] for row in order]


@pytest.mark.parametrize("engine", ["exact", "scann"])
def test_index_search_save_load(tiny, tmp_path, engine):
  idx = tiny.index(DOCS, engine=engine, progress=False)
  assert len(idx) == len(DOCS)
  want = _exact_top(tiny, DOCS, QUERIES)
  got = idx.search(QUERIES, k=3)
  assert [[h.id for h in r.hits] for r in got] == want
  first = got[0].hits[0]
  assert (
      first.rank == 1
      and first.text == {d["_id"]: d for d in DOCS}[first.id]["text"]
  )
  assert got[0].hits[0].score >= got[0].hits[1].score >= got[0].hits[2].score
  idx.save(tmp_path / "idx")
  back = tiny.load_index(tmp_path / "idx")
  again = back.search(QUERIES, k=3)
  assert [[h.id for h in r.hits] for r in again] == want
  np.testing.assert_allclose(
      [h.score for h in again[1].hits],
      [h.score for h in got[1].hits],
      rtol=0,
      atol=1e-6,
  )


def test_reasoning_search_reports_the_analysis(tiny):
  idx = tiny.index(DOCS, engine="exact", progress=False)
  (r,) = idx.search(
      ["capital of france"], k=2, reasoning=True, max_new_tokens=4
  )
  assert isinstance(r.analysis, str) and isinstance(r.emitted, bool)
  assert len(r.hits) == 2


def test_an_index_refuses_a_model_of_another_width(
    tiny, tmp_path, one_device_mesh
):
  tiny.index(DOCS, engine="exact", progress=False).save(tmp_path / "idx")
  other = SearchR3.random(
      mesh=one_device_mesh,
      hidden_size=32,
      intermediate_size=48,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
  )
  with pytest.raises(IndexInputError, match="44-wide.*32-wide"):
    other.load_index(tmp_path / "idx")


def test_readers(tmp_path):
  jsonl = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
  docs = read_documents(jsonl)
  assert [d.id for d in docs] == [d["_id"] for d in DOCS]
  assert docs[0].embedded_text == "france\nparis is the capital of france"
  beir = tmp_path / "beir"
  beir.mkdir()
  _write_jsonl(beir / "corpus.jsonl", DOCS[:2])
  assert [d.id for d in read_documents(beir)] == ["fr", "it"]
  texts = tmp_path / "texts"
  (texts / "sub").mkdir(parents=True)
  (texts / "a.txt").write_text("paris is the capital\n")
  (texts / "sub" / "b.md").write_text("rome is a city\n")
  (texts / "skip.bin").write_bytes(b"\x00\x01")
  docs = read_documents(texts)
  assert [(d.id, d.title, d.text) for d in docs] == [
      ("a.txt", "a", "paris is the capital"),
      ("sub/b.md", "b", "rome is a city"),
  ]


def test_reader_errors_name_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(DOCS[0]) + "\n{not json\n")
  with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
    read_documents(bad)
  dup = _write_jsonl(tmp_path / "dup.jsonl", [DOCS[0], DOCS[1], DOCS[0]])
  with pytest.raises(DataError, match=r"dup\.jsonl:3: duplicate .*'fr'.*1"):
    read_documents(dup)
  noid = _write_jsonl(tmp_path / "noid.jsonl", [{"text": "paris"}])
  with pytest.raises(DataError, match=r"noid\.jsonl:1: missing .*'_id'"):
    read_documents(noid)
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match=r"empty\.jsonl: no documents"):
    read_documents(tmp_path / "empty.jsonl")
  (tmp_path / "nothing").mkdir()
  with pytest.raises(DataError, match="nothing: no documents"):
    read_documents(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="missing"):
    read_documents(tmp_path / "missing")
  with pytest.raises(IndexInputError, match="duplicate id 'x'"):
    DocumentIndex.build(None, [("x", "a"), ("x", "b")])
  with pytest.raises(IndexInputError, match="no documents"):
    DocumentIndex.build(None, [])
