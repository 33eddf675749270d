"""Bad BEIR files fail with an error naming the file (and the line, and for a
byte that is not UTF-8 its offset), through the library's builder and the
programs' data path alike; nothing half-written is left behind."""

import json

import ml_collections
import pytest

from search_r3_jax import data
from search_r3_jax.data import sources

DOCS = [
    {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
    {"_id": "d2", "title": "Rome", "text": "Rome is the capital of Italy."},
    {"_id": "d3", "title": "", "text": "Berlin is a city on the Spree."},
]
QUERIES = [
    {"_id": "q1", "text": "capital of France"},
    {"_id": "q2", "text": "capital of Italy"},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n"


def _jsonl(rows) -> bytes:
  return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def folder(tmp_path):
  f = tmp_path / "beir"
  (f / "qrels").mkdir(parents=True)
  (f / "corpus.jsonl").write_bytes(_jsonl(DOCS))
  (f / "queries.jsonl").write_bytes(_jsonl(QUERIES))
  (f / "qrels" / "test.tsv").write_text(QRELS)
  return f


def _build(folder, **kwargs):
  return data.beir_builder(
      folder, data_dir=str(folder.parent / "tfds"), **kwargs
  )


def _refused(folder, message, **kwargs):
  with pytest.raises(data.DataError, match=message):
    _build(folder, **kwargs)
  assert not data.BeirFolder(
      path=folder, data_dir=str(folder.parent / "tfds"), **kwargs
  ).is_prepared()


def test_the_fixture_builds(folder):
  assert len(_build(folder).as_data_source(split="test")) == 2


@pytest.mark.parametrize(
    "name,rows", [("corpus.jsonl", DOCS), ("queries.jsonl", QUERIES)]
)
def test_a_byte_that_is_not_utf8_names_file_line_and_offset(folder, name, rows):
  lines = _jsonl(rows).splitlines(keepends=True)
  # Line 2's text gets a Latin-1 "é" (0xe9), which is not UTF-8 here.
  at = lines[1].index(b"capital")
  lines[1] = lines[1][:at] + b"\xe9" + lines[1][at:]
  (folder / name).write_bytes(b"".join(lines))
  offset = len(lines[0]) + at
  _refused(
      folder,
      rf"{name}:2: not UTF-8: byte 0xe9 at byte offset {offset} "
      rf"\(byte {at + 1} of the line\)",
  )


def test_a_byte_that_is_not_utf8_in_qrels(folder):
  head = b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td"
  (folder / "qrels" / "test.tsv").write_bytes(head + b"\xff2\t1\n")
  _refused(
      folder, rf"test\.tsv:3: not UTF-8: byte 0xff at byte offset {len(head)}"
  )


def test_a_byte_order_mark_is_not_an_error(folder):
  (folder / "corpus.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl(DOCS))
  assert len(_build(folder).as_data_source(split="corpus")) == 3


@pytest.mark.parametrize(
    "name,message",
    [
        ("corpus.jsonl", r"corpus\.jsonl: no documents \(the file is empty\)"),
        ("queries.jsonl", r"queries\.jsonl: no queries \(the file is empty\)"),
        (
            "qrels/test.tsv",
            r"test\.tsv: no judgements \(the file is empty\)",
        ),
    ],
)
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_file_is_named(folder, name, message, content):
  """Before: TFDS's "No examples were yielded", or for empty queries an
  "unknown query id" blamed on the qrels."""
  (folder / name).write_text(content)
  _refused(folder, message)


def test_qrels_with_only_a_header_are_empty(folder):
  (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
  _refused(folder, r"test\.tsv: no judgements \(the file is empty\)")


def test_a_qrels_line_for_a_query_that_does_not_exist(folder):
  (folder / "qrels" / "test.tsv").write_text(QRELS + "q9\td1\t1\n")
  _refused(folder, r"qrels[/\\]test\.tsv:4: unknown query id 'q9'")


def test_qrels_whose_every_line_is_skipped_are_empty(folder):
  (folder / "qrels" / "test.tsv").write_text("q8\td1\t1\nq9\td1\t1\n")
  _refused(
      folder,
      r"test\.tsv: no judgements left \(2 lines name an unknown document or "
      r"query\)",
      skip_unknown_qrels=True,
  )


def test_bad_json_names_file_and_line(folder):
  (folder / "queries.jsonl").write_bytes(
      _jsonl(QUERIES[:1]) + b'{"_id": "q2", "text": \n'
  )
  _refused(folder, r"queries\.jsonl:2: malformed JSON")


def test_the_programs_data_path_reports_the_same(folder):
  """Evaluation and stage 2 read a BEIR folder through sources.eval_data."""
  (folder / "queries.jsonl").write_text("")
  cfg = ml_collections.ConfigDict(
      dict(
          name="beir",
          path=str(folder),
          data_dir=str(folder.parent / "tfds"),
          num_negatives=1,
      )
  )
  with pytest.raises(data.DataError, match=r"queries\.jsonl: no queries"):
    sources.eval_data(cfg, ("test",))
